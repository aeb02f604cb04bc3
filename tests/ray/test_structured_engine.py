"""Structured outputs through the real engine (random weights: only the grammar makes answers valid): the
constrained rows match, the unconstrained rows of a mixed batch are bit-identical to a batch without
constrained rows (also under multi-step decode), a preempted constrained sequence rebuilds its matcher, and bad
grammars are ValueErrors naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
PROMPTS = ["The quick brown fox", "Describe a person as JSON:", "x", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def model(ray_session, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("structured") / "tiny-maverick", "tiny-maverick")


@pytest.fixture(scope="module")
def llm(model):
    with LLM(model, dtype="float32") as llm:  # num_scheduler_steps 8: multi-step decode
        yield llm


def _unconstrained(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=[0, 0.9][i % 2], seed=100 + i, ignore_eos=True)


def _constrained(seed: int, spec) -> SamplingParams:
    return SamplingParams(max_tokens=96, temperature=1.0, seed=seed, structured_outputs=spec)


def test_constrained_rows_match_and_others_are_bit_identical(llm):
    plain = [_unconstrained(i) for i in range(len(PROMPTS))]
    specs = [{"json": SCHEMA}, {"regex": r"[a-c]{2,5}-\d{3}"}, {"choice": ["yes", "no", "maybe"]},
             {"grammar": 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'}, {"json_object": True}]
    constrained = [_constrained(seed, specs[seed % len(specs)]) for seed in range(20)]
    alone = llm.generate(PROMPTS, plain)
    mixed = llm.generate(PROMPTS + [PROMPTS[i % 4] for i in range(20)], plain + constrained)
    for a, b in zip(alone, mixed):
        assert a.token_ids == b.token_ids and a.text == b.text
    for seed, out in enumerate(mixed[len(PROMPTS):]):
        kind, text = next(iter(specs[seed % len(specs)])), out.text
        if kind == "json_object":  # unbounded: keys and strings may run to max_tokens
            assert isinstance(json.loads(text), dict) if out.finish_reason == "stop" else text.startswith("{")
            continue
        assert out.finish_reason == "stop", (seed, text)
        if kind == "json":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "regex":
            assert re.fullmatch(r"[a-c]{2,5}-\d{3}", text), text
        elif kind == "choice":
            assert text in ("yes", "no", "maybe")
        else:
            assert re.fullmatch(r"\(\d+(\+\d+)*\)", text), text


def test_preempted_constrained_sequences_rebuild_their_matchers(model, llm):
    params = [_constrained(seed, {"json": SCHEMA}) for seed in range(8)]
    prompts = [PROMPTS[i % 4] for i in range(8)]
    with LLM(model, dtype="float32", block_size=4, num_full_blocks=40, num_chunk_blocks=40) as tight_llm:
        states = [tight_llm.add_request(p, sp) for p, sp in zip(prompts, params)]
        while tight_llm.has_work():
            tight_llm.step()
        tight = [tight_llm.completion(state) for state in states]
        assert sum(state.seq.num_preemptions for state in states) > 0
    roomy = llm.generate(prompts, params)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    for out in tight:
        jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("spec, field", [
    ({"json": {"type": "objekt"}}, "structured_outputs.json"),
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar"),
])
def test_bad_grammars_are_value_errors_naming_the_field(llm, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate("hi", SamplingParams(max_tokens=4, structured_outputs=spec))
    assert llm.generate("hi", SamplingParams(max_tokens=3, temperature=0))[0].token_ids
