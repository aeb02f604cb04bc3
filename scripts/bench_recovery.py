"""Time from SIGKILL of a data-plane actor to the next generated token (issue 17, goal <= 15 s).

    python scripts/bench_recovery.py [--preset tiny-maverick] [--attention-actors 1] [--expert-actors 2]
                                     [--requests 16] [--trials 3]

Starts one engine (float32) on a local Ray cluster, runs `--requests` greedy requests, and in each trial kills an
actor (expert actors first, then the attention actor) right after a step is launched, while its calls run. It
prints, per trial, the seconds from the kill to the next token, how long the replacement took (the engine's
own recovery time), and whether every request produced the tokens of the failure-free run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint


def _kill_during_next_step(llm: LLM, name: str) -> list[float]:
    data_plane = llm.engine.data_plane
    pid, launch, killed_at = data_plane.actor_info[name]["pid"], data_plane.launch, []

    def launch_then_kill(*args, **kwargs):
        data_plane.launch = launch
        refs = launch(*args, **kwargs)
        os.kill(pid, 9)
        killed_at.append(time.monotonic())
        return refs

    data_plane.launch = launch_then_kill
    return killed_at


def trial(llm: LLM, victim: str, prompts: list[list[int]], params: SamplingParams, expected: list) -> tuple:
    states = [llm.add_request(p, params) for p in prompts]
    for _ in range(4):  # prefill and a few decode steps
        llm.step()
    recovered_before = llm.engine.recovery.num_recoveries
    killed_at = _kill_during_next_step(llm, victim)
    counts = [len(s.seq.output_ids) for s in states]
    next_token = None
    while llm.has_work():
        llm.step()
        if next_token is None and any(len(s.seq.output_ids) > n for s, n in zip(states, counts)):
            next_token = time.monotonic() - killed_at[0]
    assert llm.engine.recovery.num_recoveries == recovered_before + 1, "no recovery happened"
    same = all(llm.completion(s).token_ids == e.token_ids for s, e in zip(states, expected))
    return next_token, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-maverick")
    parser.add_argument("--attention-actors", type=int, default=1)
    parser.add_argument("--expert-actors", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    recovery_log = logging.getLogger("llama4serve.recovery")
    recovery_log.addHandler(handler := logging.StreamHandler())
    handler.setFormatter(logging.Formatter("  %(message)s"))
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(os.path.join(tmp, args.preset), args.preset)
        t0 = time.monotonic()
        llm = LLM(model, attention_actors=args.attention_actors, expert_actors=args.expert_actors,
                  dtype="float32", num_scheduler_steps=1, max_actor_restarts=args.trials + 1)
        print(f"{args.attention_actors}x{args.expert_actors} {args.preset}: engine up in {time.monotonic() - t0:.1f} s")
        try:
            prompts = [[3 + (7 * i + j) % 250 for j in range(16 + i)] for i in range(args.requests)]
            params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
            expected = llm.generate(prompts, params)
            names = llm.engine.data_plane.names()
            victims = names[args.attention_actors:] + names[:args.attention_actors]  # expert actors first
            results = []
            for k in range(args.trials):
                victim = victims[k % len(victims)]
                seconds, same = trial(llm, victim, prompts, params, expected)
                results.append(seconds)
                print(f"trial {k}: killed {victim}: next token after {seconds:.2f} s; same tokens: {same}")
            print(f"median kill -> next token: {statistics.median(results):.2f} s (goal <= 15 s)")
        finally:
            llm.shutdown()


if __name__ == "__main__":
    main()
