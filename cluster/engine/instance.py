"""What one model instance serves and admits: the checkpoint and dtype checks, the KV pools' sizes and block
size, `max_model_len`, the stop tokens, and the validation of a request against them."""

from __future__ import annotations

from dataclasses import dataclass

from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import ModelConfig, load_model_config
from llama4serve.actors.model.weights import check_checkpoint
from llama4serve.actors.runner.image_features import vision_unsupported
from llama4serve.cluster.config import EngineConfig, resolve_max_model_len
from llama4serve.cluster.engine.block_manager import BlockManager, blocks_for_length, default_block_size
from llama4serve.cluster.inputs.prompts import PromptPreparer
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.sampling_params import SamplingParams


@dataclass(frozen=True)
class InstanceSpec:
    model_cfg: ModelConfig
    tokenizer: Tokenizer | None
    prompts: PromptPreparer
    dtype: str
    block_size: int
    chunk_size: int | None  # attention_chunk_size when some layer is chunked
    num_full_blocks: int
    num_chunk_blocks: int
    max_model_len: int
    eos_ids: frozenset[int]
    enable_prefix_caching: bool = True

    @classmethod
    def load(cls, config: EngineConfig) -> "InstanceSpec":
        """Reads and checks the checkpoint; ValueError naming the problem when it cannot be served as asked."""
        cfg = load_model_config(config.model)
        reader = CheckpointReader(config.model)
        try:
            check_checkpoint(cfg, reader)
            vision_problem = vision_unsupported(cfg, reader)
        finally:
            reader.close()
        tokenizer = Tokenizer.from_dir(config.model)
        prompts = PromptPreparer(
            config.model, tokenizer, cfg.image_token_index, vision_problem, config.max_images_per_request,
            config.max_image_bytes, config.max_image_pixels,
        )
        dtype = cfg.torch_dtype if config.dtype == "auto" else config.dtype
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.json: torch_dtype is {dtype!r}; pass dtype='float32' or 'bfloat16'")
        chunk = cfg.attention_chunk_size if cfg.chunked_layers else None
        bs = config.block_size or default_block_size(chunk)
        if chunk is not None and chunk % bs:
            raise ValueError(f"block_size is {bs}; it must divide attention_chunk_size ({chunk})")
        max_model_len = resolve_max_model_len(config, cfg.max_position_embeddings)
        num_full = config.num_full_blocks or -(-config.kv_cache_tokens // bs)
        per_seq_chunk = -(-min(chunk or bs, max_model_len) // bs) + 1
        num_chunk = config.num_chunk_blocks or per_seq_chunk * config.max_num_seqs
        eos = set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else [])
        return cls(cfg, tokenizer, prompts, dtype, bs, chunk, num_full, num_chunk, max_model_len, frozenset(eos),
                   config.enable_prefix_caching)

    def block_manager(self) -> BlockManager:
        cfg = self.model_cfg
        return BlockManager(self.num_full_blocks, self.num_chunk_blocks, self.block_size, self.chunk_size,
                            bool(cfg.full_layers), bool(cfg.chunked_layers), self.enable_prefix_caching)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the field and the allowed range when a request cannot be served."""
        vocab = self.model_cfg.vocab_size
        if not prompt_ids:
            raise ValueError("prompt is empty; it needs at least 1 token")
        for i, t in enumerate(prompt_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} at index {i} is outside the vocabulary; allowed 0..{vocab - 1}")
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids has {t}; allowed 0..{vocab - 1}")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; this deployment accepts at most {self.max_model_len} "
                "(max_model_len)"
            )
        length = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        cfg = self.model_cfg
        full, chunk = blocks_for_length(length, self.block_size, self.chunk_size, bool(cfg.full_layers),
                                        bool(cfg.chunked_layers))
        if full > self.num_full_blocks or chunk > self.num_chunk_blocks:
            raise ValueError(
                f"a sequence of {length} tokens needs {full} full and {chunk} chunk KV blocks; the cache holds "
                f"{self.num_full_blocks} and {self.num_chunk_blocks} "
                "(num_full_blocks, num_chunk_blocks); lower max_tokens or grow the cache"
            )
