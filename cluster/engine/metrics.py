"""Prometheus metrics of one model instance, recorded through `ray.util.metrics`.

Ray exports them on every node's metrics endpoint (`ray start --metrics-export-port`) with a `ray_` prefix:
`llama4serve_requests_total` is scraped as `ray_llama4serve_requests_total`. Every series also carries Ray's
`WorkerId`, `NodeAddress` and `SessionName` labels, so the gauges of several Engine replicas never overwrite
each other; sum or max over them in queries.

Recording is cheap (a metric call costs a few microseconds): per request a TTFT observation and a status count,
per streamed update a token count and an inter-token observation per token, and once a second between steps
(`flush`) the gauges and what the attention actors accumulated (expert load, all-to-all time).
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
ALL_TO_ALL_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
RECOVERY_BUCKETS = [0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0]


class RecoveryMetrics:
    """Data-plane actors the engine replaced (`cluster/engine/recovery.py`), recorded as each recovery ends."""

    def __init__(self):
        self.restarts = Counter(
            "llama4serve_actor_restarts_total", "Data-plane actors replaced after they died, by role: attention "
            "or expert.", tag_keys=("role",))
        self.seconds = Histogram(
            "llama4serve_recovery_seconds", "From the end of a failed step to its replacement actors being ready "
            "in a new process group (one observation per recovery).", boundaries=RECOVERY_BUCKETS)

    def recovered(self, roles: list[str], seconds: float) -> None:
        """One recovery that replaced an actor of each of `roles` ("attention" / "expert") in `seconds`."""
        for role in roles:
            self.restarts.inc(1, tags={"role": role})
        self.seconds.observe(seconds)


class EngineMetrics:
    """The metrics of one AsyncEngine."""

    def __init__(self, flush_interval_s: float = 1.0):
        self.flush_interval_s = flush_interval_s
        self.requests = Counter(
            "llama4serve_requests_total",
            "Requests that ended, by status: stop, length, abort, error, rejected.", tag_keys=("status",))
        self.prompt_tokens = Counter(
            "llama4serve_prompt_tokens_total", "Prompt tokens of requests whose prefill finished.")
        self.generation_tokens = Counter("llama4serve_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(
            "llama4serve_time_to_first_token_seconds", "From arrival to the first generated token.",
            boundaries=TTFT_BUCKETS)
        self.itl = Histogram(
            "llama4serve_inter_token_latency_seconds", "Between consecutive generated tokens of a request.",
            boundaries=ITL_BUCKETS)
        self.running = Gauge("llama4serve_num_requests_running", "Requests being computed.")
        self.waiting = Gauge("llama4serve_num_requests_waiting", "Requests queued for KV cache or batch room.")
        self.kv_usage = Gauge(
            "llama4serve_kv_cache_usage_ratio", "Fraction of the KV blocks in use (fullest attention actor), by "
            "pool: full (NoPE layers) or chunk (chunked-attention layers).", tag_keys=("pool",))
        self.prefix_queries = Counter(
            "llama4serve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache at admission "
            "(prompt-logprob requests, which recompute every position, are not counted).")
        self.prefix_hits = Counter(
            "llama4serve_prefix_cache_hits_total", "Prompt tokens served from the prefix cache (of the queried ones).")
        self._prefix_counted = (0, 0)  # the cumulative (queries, hits) already exported
        self.expert_tokens = Counter(
            "llama4serve_expert_tokens_total", "Token rows routed to each expert of each MoE layer (expert load).",
            tag_keys=("layer", "expert"))
        self.all_to_all = Histogram(
            "llama4serve_all_to_all_seconds", "Time an attention actor spends in the expert all-to-all "
            "(dispatch and combine of every MoE layer) in one step.", boundaries=ALL_TO_ALL_BUCKETS)
        self._last_flush = time.monotonic()

    # ---------------------------------------------------------------- per request
    def first_token(self, arrival: float, now: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(now - arrival)
        self.prompt_tokens.inc(num_prompt_tokens)

    def generated(self, num_tokens: int, since_last: float | None) -> None:
        """num_tokens new tokens of one request, since_last seconds after its previous update (None: its first
        update, whose gaps are unknown)."""
        self.generation_tokens.inc(num_tokens)
        if since_last is not None:
            gap = since_last / num_tokens
            for _ in range(num_tokens):
                self.itl.observe(gap)

    def finished(self, status: str) -> None:
        self.requests.inc(1, tags={"status": status})

    # ---------------------------------------------------------------- periodic
    def due(self) -> bool:
        return time.monotonic() - self._last_flush >= self.flush_interval_s

    def flush(self, stats: dict, actor_metrics: list[dict], moe_layers: tuple[int, ...]) -> None:
        """Exports the gauges (from `AsyncEngine.stats()`) and what each attention actor accumulated since the
        last flush (`AttentionActor.take_metrics()`)."""
        self._last_flush = time.monotonic()
        self.running.set(stats["num_requests_running"])
        self.waiting.set(stats["num_requests_waiting"])
        for pool, ratio in stats["kv_cache_usage"].items():
            self.kv_usage.set(ratio, tags={"pool": pool})
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        if queries > self._prefix_counted[0]:
            self.prefix_queries.inc(queries - self._prefix_counted[0])
        if hits > self._prefix_counted[1]:
            self.prefix_hits.inc(hits - self._prefix_counted[1])
        self._prefix_counted = (queries, hits)
        for taken in actor_metrics:
            counts = taken["expert_tokens"]  # [MoE layers, E]
            rows, experts = counts.nonzero(as_tuple=True)
            for row, expert, count in zip(rows.tolist(), experts.tolist(), counts[rows, experts].tolist()):
                self.expert_tokens.inc(count, tags={"layer": str(moe_layers[row]), "expert": str(expert)})
            for seconds in taken["all_to_all_seconds"]:
                self.all_to_all.observe(seconds)
