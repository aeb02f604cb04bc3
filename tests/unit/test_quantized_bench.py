"""`llama4serve bench --suite quantized`: the bytes a decode step reads per variant and the targets' verdicts."""

from __future__ import annotations

import pytest

from llama4serve.actors.model.config import parse_model_config
from llama4serve.cluster.checkpoints.presets import get_preset
from llama4serve.cluster.cli.bench import decode_weight_bytes
from llama4serve.cluster.cli.bench_quantized import step_bytes, targets


def test_bytes_per_step_count_what_stays_float():
    cfg = parse_model_config(get_preset("bench-small"))
    fp32 = step_bytes(cfg, "fp32", 128, 1)
    assert fp32 == decode_weight_bytes(cfg, "float32")  # the decode suite's count, top-1 routing
    assert step_bytes(cfg, "bf16", 128, 1) == fp32 / 2
    lm_head = cfg.vocab_size * cfg.hidden_size * 4
    for variant in ("fp8", "int4"):
        assert lm_head < step_bytes(cfg, variant, 128, 1) < fp32 / 1.3  # float32 lm_head counted in full
    assert step_bytes(cfg, "int4", 128, 1) < step_bytes(cfg, "fp8", 128, 1)  # int4 also quantizes attention
    assert step_bytes(cfg, "fp8", 128, 32) > step_bytes(cfg, "fp8", 128, 1)  # more distinct experts read


@pytest.mark.parametrize("variant,batch,speedup,ratio,verdict", [
    ("fp8", 1, 1.2, 1.38, True), ("fp8", 1, 1.0, 1.38, False), ("int4", 1, 1.4, 1.82, False),
    ("fp8", 32, 1.25, 2.56, True), ("fp8", 32, 1.1, 2.56, False), ("int4", 32, 1.0, 3.9, None),
    ("fp32", 1, 1.0, 1.0, None), ("bf16", 32, 0.9, 2.0, None)])
def test_targets(variant, batch, speedup, ratio, verdict):
    got = targets(variant, batch, speedup, ratio)
    assert (got[1] if got else None) is verdict
