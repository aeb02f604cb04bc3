"""Benchmark: text for a long output with stop strings, one token at a time (not a timed test).

4,096 generated tokens with 3 stop strings that never match, fed one token per step through the output
processor (incremental detokenizer + stop checks over the new text only), next to the algorithm it replaced
(decode the whole output after every token and search it). Prints the time per token of each quarter and the
last/first ratio: flat (about 1.0) for the output processor, growing with the output for the old way.

    python scripts/bench_stop_strings.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.engine.output_processor import OutputProcessor
from llama4serve.cluster.engine.scheduler import Sequence
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.sampling_params import SamplingParams

STOPS = ["<never one>", "\n\n\n\n\n\n", "zzzzqqqq"]


def _quarters(times: list[float]) -> list[float]:
    """Median seconds per token of each quarter of the output (medians: this machine is shared and noisy)."""
    q = len(times) // 4
    return [statistics.median(times[i * q:(i + 1) * q]) for i in range(4)]


def output_processor(tokenizer: Tokenizer, ids: list[int]) -> list[float]:
    seq = Sequence(0, [1], SamplingParams(max_tokens=len(ids), stop=STOPS), seed=0)
    processor = OutputProcessor(tokenizer)
    state = processor.add(seq, "bench")
    times = []
    for token in ids:
        start = time.perf_counter()
        seq.output_ids.append(token)
        assert processor.update(state) is None
        processor.delta(state)
        times.append(time.perf_counter() - start)
    return times


def whole_decode(tokenizer: Tokenizer, ids: list[int]) -> list[float]:
    """The replaced algorithm: decode everything after every token, search every stop string."""
    times, out = [], []
    for token in ids:
        start = time.perf_counter()
        out.append(token)
        text = tokenizer.decode(out)
        assert not any(s in text for s in STOPS)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, "tiny-scout")
        tokenizer = Tokenizer.from_dir(tmp)
    rng = random.Random(0)
    special = set(tokenizer.eos_token_ids)
    ids = [t for t in (rng.randrange(3, 200) for _ in range(4 * args.tokens)) if t not in special][: args.tokens]
    print(f"{args.tokens} tokens, stop strings {STOPS!r}; median microseconds per token by quarter")
    print(f"{'':22}{'Q1':>9}{'Q2':>9}{'Q3':>9}{'Q4':>9}  Q4/Q1")
    for name, run in (("output processor", output_processor), ("decode whole output", whole_decode)):
        q = _quarters(run(tokenizer, ids))
        print(f"{name:22}" + "".join(f"{x * 1e6:9.1f}" for x in q) + f"  {q[3] / q[0]:5.2f}")


if __name__ == "__main__":
    main()
