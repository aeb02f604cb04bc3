"""Prefix caching with image prompts (tiny-scout: attention chunk 32, 4 <|patch|> rows per 56 px tile): the same
image reuses the cached blocks, also when the cached prefix ends inside the image (the tail's prefill then gets
the pixels and starts at the right feature row), a different image with the same tokens reuses nothing past its
first image row, and every output equals the cache-off one."""

from __future__ import annotations

import io

import pytest
import torch

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint

Image = pytest.importorskip("PIL.Image")

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
OPTIONS = dict(dtype="float32", block_size=4, num_scheduler_steps=1)
BEFORE = "Look at this picture of a llama in the hills:"  # the image's rows lie at 28..42, across position 32
AFTER = " Describe the colours you see in it, one by one, in short words, then the shapes and then the light."


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 90, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _prompt(after: str, seed: int) -> dict:
    return {"prompt": BEFORE + "<|image|>" + after, "images": [_png(seed)]}


PROMPTS = {
    "first": _prompt(AFTER, 1),  # prefilled in one step ending in chunk [96, 128): chunk [32, 64) is not kept
    "same image, new text": _prompt(" Tell me a story about it.", 1),
    "other image": _prompt(AFTER, 2),
    "same image, new ending": _prompt(AFTER[:-6] + " dark.", 1),
}


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("prefix-images") / "tiny-scout", "tiny-scout")
    with LLM(path, enable_prefix_caching=False, **OPTIONS) as llm:
        reference = dict(zip(PROMPTS, llm.generate(list(PROMPTS.values()), GREEDY)))
    return path, reference


def _hits(llm: LLM) -> int:
    return llm.engine.replicas[0].scheduler.prefix_cache_hits


def test_images_cache_by_content_and_change_no_output(setup):
    path, reference = setup
    with LLM(path, **OPTIONS) as llm:
        outs = {"first": llm.generate(PROMPTS["first"], GREEDY)[0]}
        assert _hits(llm) == 0
        rows = llm.engine.prepare(PROMPTS["same image, new text"]).patch_positions
        outs["same image, new text"] = llm.generate(PROMPTS["same image, new text"], GREEDY)[0]
        assert _hits(llm) == 32 and rows[0] < 32 < rows[-1]  # up to the chunk boundary, inside the image
        outs["other image"] = llm.generate(PROMPTS["other image"], GREEDY)[0]
        assert _hits(llm) == 32  # its first image row is in block [28, 32): nothing the chunk rule can serve
        outs["same image, new ending"] = llm.generate(PROMPTS["same image, new ending"], GREEDY)[0]
        assert _hits(llm) >= 32 + 96  # into the last chunk, past the image: no pixels needed at all
        assert llm.engine.blocks.usage() == {"full": 0.0, "chunk": 0.0}
    assert outs["other image"].logprobs != outs["first"].logprobs  # the image's content matters
    for name, ref in reference.items():
        assert outs[name].token_ids == ref.token_ids, name
        torch.testing.assert_close(torch.tensor(outs[name].logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)
