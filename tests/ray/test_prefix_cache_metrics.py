"""The prefix-cache counters on a real Ray node's Prometheus endpoint: an AsyncEngine (in an async actor, as the
Serve Engine replica hosts it) serves a prompt, then two that share its first 32 tokens; the exported
`llama4serve_prefix_cache_queries_total` / `_hits_total` equal the engine's own counts, in tokens.

The session's Ray cluster has no metrics port, so a subprocess starts its own local node (as test_metrics.py).
"""

from __future__ import annotations

import textwrap

from metrics_node import HOSTED_ENGINE_END, metrics_driver, scrape_until, total

from llama4serve.cluster.checkpoints.maker import write_checkpoint

DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    import ray
    from llama4serve.cluster.engine.async_engine import AsyncEngine
    from llama4serve.cluster.config import EngineConfig
    from llama4serve.cluster.sampling_params import SamplingParams

    port, model = int(sys.argv[1]), sys.argv[2]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)

    @ray.remote(num_cpus=0)
    class Host:
        def __init__(self):
            self.engine = AsyncEngine(EngineConfig(model=model, dtype="float32", block_size=8, torch_threads=1))

        async def run(self):
            params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            prefix = list(range(3, 35))  # 32 tokens: one attention chunk of tiny-scout

            async def one(prompt):
                return [out async for out in self.engine.generate(prompt, params)]

            await one(prefix + [40, 41, 42])
            await asyncio.gather(one(prefix + [50]), one(prefix + [60, 61, 62, 63, 64]))
            await asyncio.sleep(1.5)  # the loop's idle flush
            stats = self.engine.stats()
            return {"queries": stats["prefix_cache_queries"], "hits": stats["prefix_cache_hits"]}

    """
) + HOSTED_ENGINE_END


def test_prefix_cache_counters_reach_prometheus(tmp_path):
    path = write_checkpoint(tmp_path / "tiny-scout", "tiny-scout")
    with metrics_driver(DRIVER, str(path)) as (port, result):
        # 35 + 33 + 37 prompt tokens looked up; the later two reuse the 32-token prefix (4 blocks of 8)
        assert result == {"queries": 35 + 33 + 37, "hits": 2 * 32}
        names = ("llama4serve_prefix_cache_queries_total", "llama4serve_prefix_cache_hits_total")
        want = [105.0, 64.0]
        samples = scrape_until(port, lambda samples: [total(samples, n) for n in names] == want)
        assert [total(samples, n) for n in names] == want
