"""The runtime tokenizer against transformers, the released chat template, and incremental detokenization."""

import random
import subprocess
import sys

import pytest

from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.checkpoints.tokenizer_files import (
    NUM_BASE_TOKENS, NUM_TOKENS, SPECIAL_TOKENS, special_token_id, write_tokenizer_files,
)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\nNew line,\ttab and  two spaces.",
    "Le café est très bon à Paris; São Paulo, München, ¿dónde?",
    "日本語の文章です。你好，世界！안녕하세요",
    "Emoji 🙂🦙🚀 👍🏽 ❤️ mixed with text",
    "<|header_start|>user<|header_end|>\n\nhi<|eot|>",
    "numbers 1234567 and code: def f(x): return {'a': [1, 2]}",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? 🦙"}]},
        {"role": "assistant", "content": "A llama."},
        {"role": "user", "content": [{"type": "text", "text": "Où vit-il ?"}]},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21°C"},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out, model_max_length=4096)
    return out


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_tokenizer_files_are_deterministic(tmp_path):
    write_tokenizer_files(tmp_path / "a", 4096)
    write_tokenizer_files(tmp_path / "b", 4096)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_special_token_ids(ours, hf):
    assert ours.vocab_size == NUM_TOKENS == len(hf)
    for token in SPECIAL_TOKENS:
        assert ours.token_to_id(token) == special_token_id(token) == hf.convert_tokens_to_ids(token)
    assert special_token_id("<|begin_of_text|>") == NUM_BASE_TOKENS
    assert ours.bos_token_id == hf.bos_token_id == special_token_id("<|begin_of_text|>")
    assert ours.pad_token_id == hf.pad_token_id == special_token_id("<|finetune_right_pad|>")
    assert hf.eos_token_id == special_token_id("<|eot|>")
    assert ours.eos_token_ids == sorted(special_token_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>"))
    with pytest.raises(ValueError, match="not one of"):
        special_token_id("<|nope|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf, text):
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == hf(text, add_special_tokens=add_special)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_encode_adds_one_bos(ours):
    bos = ours.bos_token_id
    assert ours.encode("hi")[0] == bos and ours.encode("hi", add_special_tokens=False)[0] != bos
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = ours.encode(prompt, add_special_tokens=False)
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers_and_released(ours, hf, messages, add_generation_prompt):
    from transformers.models.llama4.processing_llama4 import chat_template as released_template
    from transformers.utils.chat_template_utils import _compile_jinja_template

    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    released = _compile_jinja_template(released_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<|begin_of_text|>",
        tools=None, documents=None)
    assert text == released
    assert text.startswith("<|begin_of_text|><|header_start|>")
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n") == add_generation_prompt


def test_from_dir_without_tokenizer_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_runtime_modules_do_not_import_transformers():
    code = ("import sys, llama4serve.cluster.inputs.tokenizer, llama4serve.cluster.checkpoints.maker; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _stream(ours, ids, chunk_sizes, skip_special_tokens=True):
    detok = ours.detokenizer(skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    while i < len(ids):
        n = next(chunk_sizes)
        deltas.append(detok.add(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    assert "".join(deltas) == ours.decode(ids, skip_special_tokens)
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenizer_one_token_at_a_time(ours, skip_special_tokens):
    text = "Grüße 🦙🚀 日本語の文章<|eot|> ok 👍🏽 ❤️ 你好，世界！"
    ids = ours.encode(text)
    deltas = _stream(ours, ids, iter(lambda: 1, None), skip_special_tokens)
    assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in d for d in deltas)  # incomplete characters were held back, never emitted
    pieces = [ours.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "text should contain characters split over several tokens"
    assert "" in deltas[:-1], "some step should have held back an incomplete character"


def test_incremental_detokenizer_random_ids_and_chunks(ours):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        chunks = iter(lambda: rng.randrange(1, 4), None)
        assert "".join(_stream(ours, ids, chunks)) == ours.decode(ids)
