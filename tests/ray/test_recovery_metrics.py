"""The recovery metrics reach Prometheus: a driver on its own local Ray node (the session's cluster has no
metrics port) kills an expert actor mid-generation, and Ray's metrics endpoint shows one expert restart and one
recovery-time observation."""

from __future__ import annotations

import textwrap

from metrics_node import metrics_driver, scrape_until, total

from llama4serve.cluster.checkpoints.maker import write_checkpoint

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from llama4serve.cluster import LLM, SamplingParams

    port, model = int(sys.argv[1]), sys.argv[2]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    llm = LLM(model, attention_actors=1, expert_actors=1, dtype="float32", torch_threads=1, num_scheduler_steps=1)
    llm.add_request(list(range(3, 20)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    llm.step()
    os.kill(llm.engine.data_plane.actor_info["expert-0"]["pid"], 9)
    while llm.has_work():
        llm.step()
    print("RESULT " + json.dumps({"recoveries": llm.engine.recovery.num_recoveries}), flush=True)
    sys.stdin.readline()  # the test has scraped
    llm.shutdown()
    ray.shutdown()
    """
)


def test_restart_counter_and_recovery_histogram_are_exported(tmp_path):
    path = write_checkpoint(tmp_path / "tiny-scout", "tiny-scout")
    with metrics_driver(DRIVER, str(path)) as (port, result):
        assert result == {"recoveries": 1}
        samples = scrape_until(port, lambda samples: "llama4serve_recovery_seconds_count" in samples)
        assert total(samples, "llama4serve_actor_restarts_total", role="expert") == 1, samples
        assert total(samples, "llama4serve_actor_restarts_total", role="attention") == 0, samples
        assert total(samples, "llama4serve_recovery_seconds_count") == 1, samples
        assert 0 < total(samples, "llama4serve_recovery_seconds_sum") < 60
