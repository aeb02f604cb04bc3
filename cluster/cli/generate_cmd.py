"""`llama4serve generate`: generate from a checkpoint (by default a tiny random one made on the spot)."""

from __future__ import annotations

import argparse
import os
import shutil
import uuid
from pathlib import Path

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams


def resolve_model(model: Path | None, preset: str, cache_dir: Path) -> Path:
    """`model` when given; otherwise a random checkpoint of `preset`, written once into `cache_dir`.

    Safe when several processes ask at once (an Ingress and Engine replicas): each writes into its own temporary
    folder and renames it into place; the same preset and seed give the same bytes, so whichever lands wins.
    """
    if model is not None:
        return model
    path = cache_dir / preset
    if not (path / "config.json").is_file():
        tmp = cache_dir / f".{preset}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        write_checkpoint(tmp, preset)
        try:
            tmp.rename(path)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def add_generate_subcommand(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from prompts")
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random checkpoint)")
    p.add_argument("--preset", default="tiny-scout", help="preset made when --model is not given")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llama4serve")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--attention-actors", type=int, default=1)
    p.add_argument("--expert-actors", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=main_generate)


def main_generate(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, args.preset, args.cache_dir)
    prompts = args.prompt or ["The capital of France is", "Llama 4 is a mixture of experts"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    with LLM(str(model), attention_actors=args.attention_actors, expert_actors=args.expert_actors,
             dtype=args.dtype) as llm:
        for prompt, out in zip(prompts, llm.generate(prompts, params)):
            print(f"prompt: {prompt!r}\noutput: {out.text!r}  ({len(out.token_ids)} tokens, {out.finish_reason})\n")
    return 0
