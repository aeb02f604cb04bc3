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
from llama4serve.cluster.outputs import Completion
from llama4serve.cluster.sampling_params import SamplingParams

Prompt = str | list[int] | dict


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
    """

    def __init__(self, model: str, attention_actors: int = 1, expert_actors: int = 0, dtype: str = "auto",
                 num_scheduler_steps: int = 8, **kwargs):
        config = EngineConfig(
            model=str(model), attention_actors=attention_actors, expert_actors=expert_actors, dtype=dtype,
            num_scheduler_steps=num_scheduler_steps, **kwargs
        )
        self.engine = EngineCore(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

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
            self.engine.validate(x.token_ids, p)
        seqs = [self.engine.add_request(x, p) for x, p in zip(inputs, params_list)]
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm)
        try:
            while self.engine.has_work():
                bar.update(len(self.engine.step()))
        except BaseException:
            for seq in seqs:
                self.engine.abort(seq)
            raise
        finally:
            bar.close()
        return [self.engine.completion(seq) for seq in seqs]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
