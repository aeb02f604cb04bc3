"""Image features of the prompts an attention actor is prefilling: encoded once per (re)prefill, consumed chunk by
chunk, dropped when the last <|patch|> row is used or the engine releases the sequence.

Shapes: F feature rows of one request (its <|patch|> prompt tokens), H text hidden, R rows replaced this step.
"""

from __future__ import annotations

import torch

from llama4serve.actors.step_io import StepBatch
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.vision_model import PROJECTOR, VisionEncoder


def vision_unsupported(cfg: ModelConfig, reader: CheckpointReader) -> str | None:
    """Why this checkpoint cannot take images, or None when it can."""
    if cfg.vision is None or cfg.image_token_index is None:
        return "config.json has no vision_config (or no image_token_index)"
    try:
        cfg.vision.validate()
    except ValueError as e:
        return str(e)
    if not reader.has(PROJECTOR):
        return f"the checkpoint has no {PROJECTOR} (no vision weights)"
    return None


class ImageFeatureCache:
    """The vision encoder of one attention actor and the features of the sequences it is prefilling."""

    def __init__(self, encoder: VisionEncoder, image_token_id: int):
        self.encoder = encoder
        self.image_token_id = image_token_id
        self.features: dict[int, torch.Tensor] = {}  # seq_id -> [F, H]

    @classmethod
    def create(cls, cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype) -> "ImageFeatureCache | None":
        """None for checkpoints that cannot take images (the engine refuses image prompts for them)."""
        if vision_unsupported(cfg, reader) is not None:
            return None
        return cls(VisionEncoder(cfg.vision, reader, dtype, cfg.hidden_size), cfg.image_token_index)

    def for_step(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [R] into the step's flattened tokens, features [R, H]) of the <|patch|> prompt tokens in this
        step, or None. Encodes the images of sequences starting their prefill; drops released sequences first."""
        for seq_id in batch.released_seq_ids:
            self.features.pop(seq_id, None)
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        start = 0
        for s in batch.seqs:
            if s.image_pixels is not None:
                self.features[s.seq_id] = self.encoder.image_features(_resolve(s.image_pixels))
            features = self.features.get(s.seq_id)
            if features is not None:
                # Only the first F <|patch|> tokens of a sequence are image rows: any later one (generated, then
                # recomputed after preemption) keeps its text embedding, as in transformers.
                found = [start + j for j, t in enumerate(s.token_ids) if t == self.image_token_id]
                n = min(len(found), features.shape[0] - s.image_offset)
                rows += found[:n]
                parts.append(features[s.image_offset : s.image_offset + n])
                if s.image_offset + n >= features.shape[0]:
                    del self.features[s.seq_id]  # prefill has passed the last image row
            start += len(s.token_ids)
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long), torch.cat(parts)


def _resolve(pixels) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return pixels
    import ray

    return ray.get(pixels)
