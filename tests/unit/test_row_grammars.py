"""The wiring of structured outputs without Ray: the engine's GrammarStore (compile and serialize once per spec),
the actor's RowGrammars (one matcher per constrained sequence, masks only its rows, replays after a preemption,
reports termination), and the scheduler sending each grammar once per admission."""

from __future__ import annotations

import pytest
import torch

from llama4serve.actors.runner.grammar import RowGrammars
from llama4serve.actors.step_io import SeqOutput, SeqStep, StepBatch
from llama4serve.cluster.checkpoints.tokenizer_files import write_tokenizer_files
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.scheduler import Scheduler, Sequence
from llama4serve.cluster.inputs.grammar_store import GrammarStore
from llama4serve.cluster.inputs.structured import StructuredOutputSpec
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.sampling_params import SamplingParams

VOCAB = 608
CHOICE = StructuredOutputSpec("choice", ("yes", "no"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(root, 64)
    return root / "tokenizer.json", Tokenizer.from_dir(root)


@pytest.fixture(scope="module")
def store(tokenizer):
    return GrammarStore(tokenizer[0], VOCAB, tokenizer[1].eos_token_ids)


def _step(seq_id: int, **kwargs) -> SeqStep:
    return SeqStep(seq_id, [1], 0, [], [], [], **kwargs)


def test_the_store_compiles_and_serializes_each_spec_once(store):
    first = store.ref(CHOICE)
    assert store.ref(StructuredOutputSpec("choice", ("yes", "no"), field="other")) is first  # field is no key
    assert store.ref(StructuredOutputSpec("regex", "[0-9]+")).key != first.key
    assert isinstance(first.grammar_json, str) and first.tokenizer_key
    with pytest.raises(ValueError, match=r"structured_outputs.regex is not a valid regular expression"):
        store.ref(StructuredOutputSpec("regex", "(", field="structured_outputs.regex"))


def test_rows_are_masked_only_where_constrained_and_replay_restores_the_state(store, tokenizer):
    tok, ref = tokenizer[1], store.ref(CHOICE)
    grammars = RowGrammars()
    grammars.begin_step(StepBatch([_step(0, grammar=ref), _step(1)]))
    seqs = [_step(0), _step(1)]
    logits = torch.randn(2, VOCAB)
    masked = grammars.mask(seqs, logits)
    assert torch.equal(masked[1], logits[1]) and masked is not logits
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t in allowed)
    ids = tok.encode("yes", add_special_tokens=False) + [tok.eos_token_ids[0]]
    outputs = []
    for t in ids:
        outputs.append(SeqOutput(0))
        grammars.accept(seqs[:1], [t], outputs[-1:])
    assert [o.grammar_terminated for o in outputs] == [False] * (len(ids) - 1) + [True]
    assert grammars.mask([_step(0, num_generated=len(ids)), seqs[1]], logits) is logits  # terminated: no mask

    # A step redone after a peer died mid-call: the matcher rolls back to the engine's num_generated.
    one = [_step(0, num_generated=1)]
    fresh = RowGrammars()
    fresh.begin_step(StepBatch([_step(0, grammar=ref)]))
    fresh.accept(seqs[:1], ids[:1], [SeqOutput(0)])
    expected = fresh.mask(one, logits[:1])
    assert torch.equal(grammars.mask(one, logits[:1]), expected)
    assert grammars.accepted[0] == 1

    # A recompute after preemption: release, then the first step replays the tokens generated so far.
    grammars.begin_step(StepBatch([_step(0, grammar=ref, grammar_replay=ids[:1])], released_seq_ids=[0]))
    assert torch.equal(grammars.mask(one, logits[:1]), expected)
    grammars.begin_step(StepBatch([], released_seq_ids=[0]))
    assert grammars.mask(seqs, logits) is logits and not grammars.matchers


def test_a_replay_that_breaks_the_grammar_is_refused(store, tokenizer):
    z = tokenizer[1].encode("z", add_special_tokens=False)  # neither "yes" nor "no" starts with it
    with pytest.raises(ValueError, match="does not match its grammar"):
        RowGrammars().begin_step(StepBatch([_step(3, grammar=store.ref(CHOICE), grammar_replay=z)]))


def test_the_scheduler_sends_a_grammar_once_per_admission(store):
    sched = Scheduler(BlockManager(100, 100, 4, 8), max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence(seq_id=0, prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=8), seed=0)
    seq.grammar = store.ref(CHOICE)
    sched.add(seq)
    (_, step), = sched.schedule()
    assert step.grammar is seq.grammar and step.grammar_replay == []
    seq.num_computed, seq.output_ids = step.end_pos, [5]
    sched.blocks.finish_step(0)
    (_, step), = sched.schedule()
    assert step.grammar is None
    sched.preempt(seq)
    assert sched.take_released() == [0]
    (_, step), = sched.schedule()
    assert step.grammar is seq.grammar and step.grammar_replay == [5]
    sched.postprocess([(seq, step)], [SeqOutput(0, token_id=9, grammar_terminated=True)], 1)
    assert seq.finish_reason == "stop" and sched.take_released() == [0]
