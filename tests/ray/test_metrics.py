"""The llama4serve_* metrics on a real Ray node's Prometheus endpoint, after a few requests.

The session's Ray cluster has no metrics port, so a subprocess starts its own local node (`_metrics_export_port`,
a short report interval), hosts an AsyncEngine in an async actor (as the Serve Engine replica does) on a 1 + 1
topology, runs the requests and stays up while this test scrapes; its Ray node goes down with it.
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict

import pytest
from metrics_node import HOSTED_ENGINE_END, metrics_driver, scrape_until, total as _total

from llama4serve.cluster.checkpoints.maker import write_checkpoint

PROMPT_LENGTHS = (5, 9, 17)
MAX_TOKENS = 6

DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    import ray
    from llama4serve.cluster.engine.async_engine import AsyncEngine
    from llama4serve.cluster.config import EngineConfig
    from llama4serve.cluster.sampling_params import SamplingParams

    port, model, lengths, max_tokens = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)

    @ray.remote(num_cpus=0)
    class Host:
        def __init__(self):
            self.engine = AsyncEngine(EngineConfig(model=model, dtype="float32", attention_actors=1, expert_actors=1,
                                                   block_size=8, torch_threads=1))

        async def run(self):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

            async def one(n):
                return [len(out.token_ids) async for out in self.engine.generate(list(range(3, 3 + n)), params)]

            emitted = await asyncio.gather(*(one(n) for n in lengths))
            try:  # rejected: a token id outside the vocabulary
                [out async for out in self.engine.generate([10**9], params)]
            except ValueError:
                pass
            await asyncio.sleep(0.5)  # the loop's idle flush
            cfg = self.engine.core.model_cfg
            return {"generated": sum(map(sum, emitted)), "moe_layers": list(cfg.moe_layers),
                    "top_k": cfg.num_experts_per_tok, "num_experts": cfg.num_experts}

    """
) + HOSTED_ENGINE_END


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(samples from the endpoint once every request shows, the driver's figures)."""
    path = write_checkpoint(tmp_path_factory.mktemp("metrics") / "tiny-scout", "tiny-scout")
    with metrics_driver(DRIVER, str(path), json.dumps(PROMPT_LENGTHS), str(MAX_TOKENS)) as (port, result):
        samples = scrape_until(port, lambda samples: (
            _total(samples, "llama4serve_requests_total") == len(PROMPT_LENGTHS) + 1
            and "llama4serve_all_to_all_seconds_count" in samples
            and _total(samples, "llama4serve_num_requests_running") == 0
            and _expert_sums(samples) == _expected_expert_sums(result)))
        yield samples, result


def _expert_sums(samples: dict) -> dict[str, float]:
    sums = defaultdict(float)
    for s in samples.get("llama4serve_expert_tokens_total", []):
        sums[s.labels["layer"]] += s.value
    return dict(sums)


def _expected_expert_sums(result: dict) -> dict[str, float]:
    # Every prompt token and every generated token but the last goes through each MoE layer, top_k rows each.
    forward_tokens = sum(n + MAX_TOKENS - 1 for n in PROMPT_LENGTHS)
    return {str(layer): float(forward_tokens * result["top_k"]) for layer in result["moe_layers"]}


def test_request_and_token_counters(scraped):
    samples, result = scraped
    assert _total(samples, "llama4serve_requests_total", status="length") == len(PROMPT_LENGTHS)
    assert _total(samples, "llama4serve_requests_total", status="rejected") == 1
    assert _total(samples, "llama4serve_prompt_tokens_total") == sum(PROMPT_LENGTHS)
    generated = _total(samples, "llama4serve_generation_tokens_total")
    assert generated == result["generated"] == len(PROMPT_LENGTHS) * MAX_TOKENS


def test_latency_histograms(scraped):
    samples, _ = scraped
    assert _total(samples, "llama4serve_time_to_first_token_seconds_count") == len(PROMPT_LENGTHS)
    assert _total(samples, "llama4serve_time_to_first_token_seconds_sum") > 0
    # One gap per token after each request's first update (fewer when updates carry several tokens).
    gaps = _total(samples, "llama4serve_inter_token_latency_seconds_count")
    assert 1 <= gaps <= len(PROMPT_LENGTHS) * (MAX_TOKENS - 1)
    assert _total(samples, "llama4serve_inter_token_latency_seconds_sum") > 0
    inf = [s for s in samples["llama4serve_time_to_first_token_seconds_bucket"] if s.labels["le"] == "+Inf"]
    assert sum(s.value for s in inf) == len(PROMPT_LENGTHS)
    assert _total(samples, "llama4serve_all_to_all_seconds_count") >= MAX_TOKENS  # at least one per decode step
    assert _total(samples, "llama4serve_all_to_all_seconds_sum") > 0


def test_queue_and_kv_cache_gauges(scraped):
    samples, _ = scraped
    assert _total(samples, "llama4serve_num_requests_running") == 0  # idle after the requests
    assert _total(samples, "llama4serve_num_requests_waiting") == 0
    pools = {s.labels["pool"]: s.value for s in samples["llama4serve_kv_cache_usage_ratio"]}
    assert set(pools) == {"full", "chunk"}
    assert all(0.0 <= v <= 1.0 for v in pools.values())


def test_expert_load_sums_to_routed_tokens_per_layer(scraped):
    samples, result = scraped
    assert _expert_sums(samples) == _expected_expert_sums(result)
    experts = {int(s.labels["expert"]) for s in samples["llama4serve_expert_tokens_total"]}
    assert experts <= set(range(result["num_experts"])) and len(experts) > 1
