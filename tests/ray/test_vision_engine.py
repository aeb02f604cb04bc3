"""Image prompts through the engine (float32): prompt logprobs over the whole sequence and greedy continuations
equal transformers' Llama4ForConditionalGeneration given the same input_ids and pixel_values; chunked prefill,
preemption and the expert-parallel topologies 1x2 and 2x3 change nothing."""

from __future__ import annotations

import io
import json

import pytest
import torch

from hf_reference import SCOUT_LIKE, perturb_parameters
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import processor_config
from llama4serve.cluster.inputs.image_processor import ImageProcessor
from llama4serve.cluster.checkpoints.presets import TINY_VOCAB_SIZE
from llama4serve.cluster.checkpoints.tokenizer_files import special_token_id, write_tokenizer_files

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

# A vision tower modeling_llama4 can run images through: 56 px tiles, 4 <|patch|> tokens per tile.
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56,
              patch_size=14, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=True)
PROMPTS = {
    "one image": ("<|image|>Describe this picture.", [(90, 40)]),
    "two images": ("Compare <|image|> with <|image|> in one word.", [(130, 70), (50, 50)]),
}
OPTIONS = dict(dtype="float32", block_size=8, kv_cache_tokens=2048)


def _png(width: int, height: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _prompt(name: str) -> dict:
    text, sizes = PROMPTS[name]
    return {"prompt": text, "images": [_png(w, h, seed=i + 7 * len(sizes)) for i, (w, h) in enumerate(sizes)]}


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    """A checkpoint transformers writes (with our tokenizer and processor files), our greedy runs on it, and
    transformers' answers for the same input_ids and pixel_values."""
    path = tmp_path_factory.mktemp("vision-engine")
    torch.manual_seed(0)
    text = dict(SCOUT_LIKE, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=4096)
    cfg = transformers.Llama4Config(
        text_config=text, vision_config=VISION, image_token_index=special_token_id("<|patch|>"),
        boi_token_index=special_token_id("<|image_start|>"), eoi_token_index=special_token_id("<|image_end|>"),
    )
    model = transformers.Llama4ForConditionalGeneration(cfg).eval()
    perturb_parameters(model.vision_model, 1)
    perturb_parameters(model.multi_modal_projector, 2)
    model.save_pretrained(path, max_shard_size="300KB")
    write_tokenizer_files(path, 4096)
    (path / "processor_config.json").write_text(json.dumps(processor_config(cfg.to_dict())))

    prompts = {name: _prompt(name) for name in PROMPTS}
    with LLM(path, **OPTIONS) as llm:
        ours = dict(zip(prompts, llm.generate(list(prompts.values()), GREEDY)))
    processor = ImageProcessor.from_dir(path)
    reference = {}
    for name, prompt in prompts.items():
        pixels = torch.cat([processor.process(b).pixel_values for b in prompt["images"]]).float()
        reference[name] = (pixels, model)
    return path, prompts, ours, reference


@torch.no_grad()
def _hf_logprobs(model, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], pixels: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation recomputed from scratch each step, pixel_values passed every time."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_image_prompts_match_transformers(setup, name):
    _, prompts, ours, reference = setup
    out, (pixels, model) = ours[name], reference[name]
    ids = out.prompt_token_ids
    patch = special_token_id("<|patch|>")
    assert ids.count(patch) == pixels.shape[0] * 4 and ids.count(special_token_id("<|image|>")) == len(
        prompts[name]["images"])
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), _hf_logprobs(model, ids, pixels),
                               atol=1e-3, rtol=0)
    assert out.token_ids == _hf_greedy(model, ids, pixels, GREEDY.max_tokens)
    # The image really steers the model: without pixel_values the last position's logits differ.
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        seen = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits[0, -1]
    assert not torch.allclose(plain, seen, atol=1e-3)


def _same(outs, ours) -> None:
    for name, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == ours[name].prompt_token_ids
        assert out.token_ids == ours[name].token_ids, name
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]),
                                   torch.tensor(ours[name].prompt_logprobs[1:]), atol=1e-4, rtol=0)


def test_chunked_prefill_and_preemption_change_nothing(setup):
    """8-token chunks split every image across steps; a 12-block cache (96 tokens) holds one sequence at a time
    with room to spare, so the second sequence is preempted and its features recomputed."""
    path, prompts, ours, _ = setup
    with LLM(path, max_num_batched_tokens=8, **OPTIONS) as llm:
        _same(llm.generate([prompts[n] for n in PROMPTS], GREEDY), ours)
    with LLM(path, max_num_batched_tokens=8, **dict(OPTIONS, num_full_blocks=12, num_chunk_blocks=6)) as llm:
        engine = llm
        states = [engine.add_request(prompts[n], GREEDY) for n in list(PROMPTS) * 2]
        seqs = [s.seq for s in states]
        while engine.has_work():
            engine.step()
        assert sum(s.num_preemptions for s in seqs) > 0  # the budget really forced preemptions
        outs = [engine.completion(s) for s in states]
    _same(outs[:2], ours)
    _same(outs[2:], ours)


@pytest.mark.parametrize("attention, experts", [(1, 2), (2, 3)])
def test_expert_parallel_topologies_give_the_same_outputs(setup, attention, experts):
    path, prompts, ours, _ = setup
    with LLM(path, attention_actors=attention, expert_actors=experts, **OPTIONS) as llm:
        _same(llm.generate([prompts[n] for n in PROMPTS], GREEDY), ours)


def test_chat_and_token_id_forms_expand_the_same(setup):
    path, prompts, ours, _ = setup
    prompt = prompts["one image"]
    with LLM(path, **OPTIONS) as llm:
        tok = llm.tokenizer
        ids = tok.encode(prompt["prompt"])
        by_ids = llm.generate({"prompt": ids, "images": prompt["images"]}, GREEDY)[0]
        messages = [{"role": "user", "content": [{"type": "image", "image": prompt["images"][0]},
                                                 {"type": "text", "text": "Describe this picture."}]}]
        chat = llm.generate({"messages": messages}, GREEDY)[0]
        expected = ImageProcessor.expand_prompt(
            tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": "Describe this picture."}]}]),
            [ImageProcessor.from_dir(path).process(prompt["images"][0])],
        )
        assert chat.prompt_token_ids == tok.encode(expected, add_special_tokens=False)
        assert by_ids.prompt_token_ids == ours["one image"].prompt_token_ids
        assert by_ids.token_ids == ours["one image"].token_ids

        truncated = prompt["images"][0][:60]
        bad = [
            ({"prompt": "<|image|> and <|image|>", "images": [prompt["images"][0], truncated]},
             r"images\[1\]: .*corrupt or truncated"),
            ({"prompt": "<|image|>", "images": [_png(1, 1, 0)]}, r"images\[0\]: 1x1 pixels is too small"),
            ({"prompt": "no placeholder", "images": prompt["images"]}, r"0 <\|image\|> placeholders but 1 images"),
            ({"prompt": "<|image|>" * 9, "images": prompt["images"] * 9}, r"9 images; .* at most 8"),
            ({"messages": [{"role": "user", "content": [{"type": "image", "image": b"GIF89a..."}]}]},
             r"messages\[0\]\.content\[0\]: not a PNG, JPEG or WebP image \(it looks like GIF\)"),
        ]
        for bad_prompt, message in bad:
            with pytest.raises(ValueError, match=message):
                llm.generate(bad_prompt, GREEDY)
        assert llm.generate(prompt, GREEDY)[0].token_ids == ours["one image"].token_ids  # still serving


# -- the pieces alone: no Ray, no checkpoint -------------------------------------------------------------------


def _step(seq_id: int, token_ids: list[int], start: int, **kwargs):
    from llama4serve.actors.step_io import SeqStep

    return SeqStep(seq_id, token_ids, start, [], [], [], **kwargs)


def test_feature_cache_feeds_chunks_in_order_and_forgets():
    from llama4serve.actors.step_io import StepBatch
    from llama4serve.actors.runner.image_features import ImageFeatureCache

    class RowNumbers:  # feature row k is k everywhere; 2 rows per tile
        def image_features(self, pixels):
            return torch.arange(pixels.shape[0] * 2, dtype=torch.float32)[:, None].expand(-1, 3)

    cache, patch = ImageFeatureCache(RowNumbers(), image_token_id=9), 9
    pixels = torch.zeros(2, 3, 4, 4)  # 4 feature rows
    rows, features = cache.for_step(StepBatch([_step(0, [1, 2], 5), _step(1, [5, patch, patch, 7], 0,
                                                                           image_pixels=pixels)]))
    assert rows.tolist() == [3, 4] and features[:, 0].tolist() == [0, 1]
    # The last chunk also holds a generated <|patch|> (recompute after preemption): it keeps its text embedding.
    rows, features = cache.for_step(StepBatch([_step(1, [patch, patch, 3, patch], 4, image_offset=2)]))
    assert rows.tolist() == [0, 1] and features[:, 0].tolist() == [2, 3] and cache.features == {}
    assert cache.for_step(StepBatch([_step(1, [patch], 8)])) is None  # decode never touches images
    cache.for_step(StepBatch([_step(2, [patch], 0, image_pixels=pixels)]))
    assert set(cache.features) == {2}
    cache.for_step(StepBatch([_step(3, [1], 0)], released_seq_ids=[2]))
    assert cache.features == {}


def test_scheduler_sends_pixels_once_per_prefill_and_releases():
    from llama4serve.cluster.engine.block_manager import BlockManager
    from llama4serve.cluster.engine.scheduler import Scheduler, SeqImages, Sequence

    sched = Scheduler(BlockManager(100, 100, 4, 8), max_num_seqs=4, max_num_batched_tokens=4)
    seq = Sequence(0, [1, 9, 9, 9, 9, 9, 2, 3], SamplingParams(max_tokens=2), 0,
                   images=SeqImages("pixels-ref", [1, 2, 3, 4, 5]))
    sched.add(seq)
    steps = []
    while seq.num_computed < 8:
        [(_, step)] = sched.schedule()
        steps.append((step.start_pos, step.image_pixels, step.image_offset))
        seq.num_computed = step.end_pos
        sched.blocks.finish_step(0)
    assert steps == [(0, "pixels-ref", 0), (4, None, 3)]
    sched.preempt(seq)
    assert sched.take_released() == [0] and sched.take_released() == []
    [(_, step)] = sched.schedule()  # recomputed from 0: the pixels go again
    assert step.image_pixels == "pixels-ref"
    sched.finish(seq, "abort")
    assert sched.take_released() == [0] and seq.images.pixels is None


def test_text_only_checkpoint_refuses_images(tmp_path):
    from llama4serve.cluster.inputs.prompts import PromptPreparer
    from llama4serve.cluster.inputs.tokenizer import Tokenizer

    write_tokenizer_files(tmp_path, 64)
    prep = PromptPreparer(str(tmp_path), Tokenizer.from_dir(tmp_path), None, "config.json has no vision_config",
                          8, 1000, 1000)
    with pytest.raises(ValueError, match=r"images\[0\]: this model does not take images \(config.json has no"):
        prep.prepare({"prompt": "<|image|>", "images": [b"x"]})
    assert prep.prepare({"prompt": "hi", "images": []}).pixel_values is None
    with pytest.raises(ValueError, match="unknown keys"):
        prep.prepare({"prompt": "hi", "image": [b"x"]})
