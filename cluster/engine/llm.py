"""The offline Python API: `LLM(model_dir, ...).generate(prompts, params) -> list[Completion]`.

A prompt is a string, a list of token ids, or a dict: `{"prompt": "<|image|>Describe it", "images": [png_bytes]}`
(one `<|image|>` per image; the prompt may also be token ids) or `{"messages": [...]}` (chat, with
`{"type": "image", "image": bytes}` content parts). See `cluster/inputs/prompts.py`.
"""

from __future__ import annotations

from typing import Sequence as Seq

from tqdm import tqdm

from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.engine.core import EngineCore
from llama4serve.cluster.engine.output_processor import OutputProcessor, RequestState
from llama4serve.cluster.inputs import Prompt
from llama4serve.cluster.inputs.prompts import PromptInputs
from llama4serve.cluster.outputs import Completion
from llama4serve.cluster.sampling_params import SamplingParams


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    """A model instance on the local (or current) Ray cluster.

    LLM(model_dir, attention_actors=1, expert_actors=0, dtype="float32", **EngineConfig fields)

    Offline generation has nobody reading tokens as they come, so `num_scheduler_steps` defaults to 8 here
    (the engine still runs one step per call while any request waits for admission); servers keep 1.
    `generate` drives the engine to the end; `add_request` / `step` / `completion` drive it one step at a time.
    """

    def __init__(self, model: str, attention_actors: int = 1, expert_actors: int = 0, dtype: str = "auto",
                 num_scheduler_steps: int = 8, **kwargs):
        config = EngineConfig(
            model=str(model), attention_actors=attention_actors, expert_actors=expert_actors, dtype=dtype,
            num_scheduler_steps=num_scheduler_steps, **kwargs
        )
        self.engine = EngineCore(config)
        self.output = OutputProcessor(self.engine.tokenizer)
        self._states: dict[int, RequestState] = {}

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def add_request(self, prompt: Prompt | PromptInputs, params: SamplingParams) -> RequestState:
        inputs = prompt if isinstance(prompt, PromptInputs) else self.engine.prepare(prompt)
        seq = self.engine.add_request(inputs, params)
        self._states[seq.seq_id] = state = self.output.add(seq, str(seq.seq_id))
        return state

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[RequestState]:
        """Runs one engine step; returns the requests that finished in it."""
        finished = []
        for seq in self.engine.step():
            state = self._states[seq.seq_id]
            keep = self.output.update(state)
            if keep is not None:  # a stop string ended it
                self.engine.abort(seq, "stop", keep)
            if seq.finish_reason is not None:
                finished.append(self._states.pop(seq.seq_id))
        return finished

    def completion(self, state: RequestState) -> Completion:
        return self.output.completion(state)

    def abort(self, state: RequestState) -> None:
        self.engine.abort(state.seq)
        self._states.pop(state.seq.seq_id, None)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Completions in the order of `prompts`. All requests are validated before any is queued."""
        prompt_list = _as_prompt_list(prompts)
        if not prompt_list:
            raise ValueError("prompts is empty; give at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"params has {len(params_list)} entries; prompts has {len(prompt_list)}")
        inputs = [self.engine.prepare(p) for p in prompt_list]
        for x, p in zip(inputs, params_list):
            self.engine.spec.validate(x.token_ids, p)
            self.engine.grammar_ref(p)  # compiles each distinct structured-output spec once, before any is queued
        states = [self.add_request(x, p) for x, p in zip(inputs, params_list)]
        bar = tqdm(total=len(states), desc="generate", disable=not use_tqdm)
        try:
            while self.has_work():
                bar.update(len(self.step()))
        except BaseException:
            for state in states:
                self.abort(state)
            raise
        finally:
            bar.close()
        return [self.completion(state) for state in states]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
