"""Llama 4 image preprocessing without torchvision: Pillow decodes, torch resizes and normalises.

Mirrors transformers' Llama4ImageProcessor (image_processing_llama4.py) and Llama4Processor._prompt_split_image:
the image is resized without distortion into the best-fitting canvas of `tile_size` tiles (at most `max_patches`
tiles), padded with black to the canvas, rescaled and normalised in bfloat16 (as the reference), split into tiles
row-major, and followed by a global thumbnail tile when there is more than one tile. The prompt expansion is

    <|image_start|> [ (<|patch|>*T <|tile_x_separator|>)... <|patch|>*T <|tile_y_separator|> ]*rows <|image|>
    <|patch|>*T <|image_end|>

with the bracketed grid present only for multi-tile images and T = <|patch|> tokens per tile.
Shapes: N tiles, S = tile_size.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

IMAGE_TOKEN = "<|image|>"  # the placeholder a chat template emits for an image part
PATCH_TOKEN = "<|patch|>"
START_TOKEN, END_TOKEN = "<|image_start|>", "<|image_end|>"
TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|tile_x_separator|>", "<|tile_y_separator|>"
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")
_MAGIC = (  # (prefix test, format name) for the message when a format is refused
    (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "PNG"),
    (lambda b: b.startswith(b"\xff\xd8\xff"), "JPEG"),
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", "WEBP"),
    (lambda b: b.startswith((b"GIF87a", b"GIF89a")), "GIF"),
    (lambda b: b.startswith(b"BM"), "BMP"),
    (lambda b: b.startswith((b"II*\x00", b"MM\x00*")), "TIFF"),
    (lambda b: b[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"), "AVIF/HEIC"),
    (lambda b: b.lstrip().startswith((b"<svg", b"<?xml")), "SVG"),
)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision encoder and the prompt.

    pixel_values [N, 3, S, S] bfloat16 (the reference's dtype; exact, so casting up loses nothing): the tiles
    row-major, then the global tile when N > 1. aspect_ratio: (tile rows, tile columns). prompt: the text that
    replaces one `<|image|>` placeholder; num_patch_tokens: its `<|patch|>` count (= N * tokens_per_tile).
    """

    pixel_values: torch.Tensor
    aspect_ratio: tuple[int, int]
    prompt: str
    num_patch_tokens: int

    def token_ids(self, token_to_id: Callable[[str], int | None]) -> list[int]:
        """The prompt expansion as ids, via a tokenizer's `token_to_id` (each piece is one special token)."""
        ids = []
        for piece in _split_special(self.prompt):
            token_id = token_to_id(piece)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {piece} token; it is needed to expand image prompts")
            ids.append(token_id)
        return ids


def _split_special(text: str) -> list[str]:
    return [p + ">" for p in text.split(">") if p]


@lru_cache(maxsize=8)
def supported_resolutions(max_num_tiles: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """Canvas sizes (height, width) of every tile grid with at most `max_num_tiles` tiles, in the reference's
    order (find_supported_resolutions: grouped by aspect ratio in first-seen order, largest tile count first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for num_tiles in range(max_num_tiles, 0, -1):
        factors = sorted({d for i in range(1, int(num_tiles**0.5) + 1) if num_tiles % i == 0
                          for d in (i, num_tiles // i)})
        for rows in factors:
            by_ratio[rows / (num_tiles // rows)].append((rows, num_tiles // rows))
    return tuple((r * tile_size, c * tile_size) for group in by_ratio.values() for r, c in group)


def best_fit_canvas(image_size: tuple[int, int], resolutions: tuple[tuple[int, int], ...],
                    resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The reference's get_best_fit: the canvas needing the smallest upscale (or, if none can upscale, the least
    downscale) without distortion; ties go to the smallest area. float32 arithmetic as the reference."""
    candidates = torch.tensor(resolutions)  # [R, 2]
    scale_h = candidates[:, 0] / image_size[0]
    scale_w = candidates[:, 1] / image_size[1]
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    upscaling = scales[scales >= 1]
    if len(upscaling) > 0:
        selected = upscaling.max() if resize_to_max_canvas else upscaling.min()
    else:
        selected = scales[scales < 1].max()
    chosen = candidates[scales == selected]
    best = chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def size_without_distortion(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """get_max_res_without_distortion: the largest (height, width) inside `target` with the image's aspect."""
    (height, width), (target_h, target_w) = image_size, target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), target_h), target_w
    return target_h, min(math.floor(width * scale_h), target_w)


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], antialiased bilinear exactly as torchvision.transforms.v2 does on CPU
    (native uint8 kernel where the CPU capability names AVX2, else float32 + round)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if "AVX2" in torch.backends.cpu.get_cpu_capability():
        return F.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(image[None].float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().to(torch.uint8)


class ImageProcessor:
    """Bytes of one PNG/JPEG/WebP image -> `ProcessedImage`. Settings come from the checkpoint (`from_dir`)."""

    def __init__(self, *, tile_size: int, patch_size: int, pixel_shuffle_ratio: float = 0.5, max_patches: int = 16,
                 image_mean: tuple[float, ...] = (0.5, 0.5, 0.5), image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255, resize_to_max_canvas: bool = False,
                 max_pixels: int = 25_000_000, min_side: int = 2, max_bytes: int = 20 * 2**20):
        if tile_size % patch_size:
            raise ValueError(f"tile size {tile_size} is not a multiple of the patch size {patch_size}")
        self.tile_size = tile_size
        self.patch_size = patch_size
        self.downsample_ratio = int(round(1.0 / pixel_shuffle_ratio**2))
        self.max_patches = max_patches
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.rescale_factor = rescale_factor
        self.resize_to_max_canvas = resize_to_max_canvas
        self.max_pixels, self.min_side, self.max_bytes = max_pixels, min_side, max_bytes

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens per tile: (S / patch)^2 / downsample ratio, as Llama4Processor.replace_image_token."""
        return (self.tile_size // self.patch_size) ** 2 // self.downsample_ratio

    @classmethod
    def from_dir(cls, model_dir: str | Path, **limits) -> "ImageProcessor":
        """Settings from `preprocessor_config.json` (released layout) or the `image_processor` entry of
        `processor_config.json` (transformers 5 layout), the processor's `patch_size` from `processor_config.json`,
        and `config.json`'s vision_config for whatever those lack. `limits`: max_pixels, min_side, max_bytes."""
        root = Path(model_dir)

        def read(name: str) -> dict:
            path = root / name
            if not path.is_file():
                return {}
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None

        vision = read("config.json").get("vision_config") or {}
        processor = read("processor_config.json")
        image = read("preprocessor_config.json") or processor.get("image_processor") or {}
        if not vision and not image:
            raise ValueError(f"{root}: no vision_config in config.json and no preprocessor_config.json; "
                             "this checkpoint cannot take images")
        size = image.get("size") or {"height": vision.get("image_size", 336), "width": vision.get("image_size", 336)}
        if size.get("height") != size.get("width"):
            raise ValueError(f"{root}: preprocessor size {size} is not square; Llama 4 tiles are square")
        if image.get("resample", 2) != 2:
            raise ValueError(f"{root}: preprocessor resample {image['resample']} is not supported; only 2 (bilinear)")
        return cls(
            tile_size=int(size["height"]),
            patch_size=int(processor.get("patch_size", vision.get("patch_size", 14))),
            pixel_shuffle_ratio=float(processor.get("pixel_shuffle_ratio", vision.get("pixel_shuffle_ratio", 0.5))),
            max_patches=int(image.get("max_patches", 16)),
            image_mean=tuple(image.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(image.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(image.get("rescale_factor", 1 / 255)),
            resize_to_max_canvas=bool(image.get("resize_to_max_canvas", False)),
            **limits,
        )

    def decode(self, image_bytes: bytes, index: int = 0) -> torch.Tensor:
        """Bytes -> uint8 RGB [3, H, W] (EXIF orientation applied, transparency composited onto white).
        ValueError naming image `index` for unsupported, corrupt, too small or too large images."""
        from PIL import Image, ImageOps

        where = f"image {index}"
        if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
            raise ValueError(f"{where}: expected the image file's bytes, got {type(image_bytes).__name__}")
        if len(image_bytes) > self.max_bytes:
            raise ValueError(f"{where}: {len(image_bytes)} bytes is over the limit of {self.max_bytes} bytes")
        head = bytes(image_bytes[:16])
        kind = next((name for test, name in _MAGIC if test(head)), None)
        if kind not in SUPPORTED_FORMATS:
            seen = f"it looks like {kind}" if kind else "its bytes are not a known image format"
            raise ValueError(f"{where}: not a PNG, JPEG or WebP image ({seen})")
        try:
            img = Image.open(io.BytesIO(image_bytes), formats=[kind])
            width, height = img.size
            if min(width, height) < self.min_side:
                raise ValueError(f"{where}: {width}x{height} pixels is too small; "
                                 f"each side needs at least {self.min_side} pixels")
            if width * height > self.max_pixels:
                raise ValueError(f"{where}: {width}x{height} = {width * height} pixels is over the limit of "
                                 f"{self.max_pixels} decoded pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            # transformers.image_transforms.convert_to_rgb: alpha is composited onto white.
            if "A" in img.getbands() or img.info.get("transparency") is not None:
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            img = img.convert("RGB")
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except ValueError as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where}: the {kind} data is corrupt or truncated ({e})") from None
        except Image.DecompressionBombError as e:  # Pillow's own bound, checked on the header before ours
            raise ValueError(f"{where}: too many pixels ({e}); the limit is {self.max_pixels} decoded pixels") from None
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"{where}: the {kind} data is corrupt or truncated ({e})") from None
        return data.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()

    def process(self, image_bytes: bytes, index: int = 0) -> ProcessedImage:
        """Decode, tile and normalise one image; `index` (its position in the request) names it in errors."""
        return self.process_rgb(self.decode(image_bytes, index))

    def process_rgb(self, image: torch.Tensor) -> ProcessedImage:
        """uint8 RGB [3, H, W] -> tiles and prompt (Llama4ImageProcessor._preprocess for one image)."""
        size = self.tile_size
        image_size = (int(image.shape[1]), int(image.shape[2]))
        canvas = best_fit_canvas(image_size, supported_resolutions(self.max_patches, size), self.resize_to_max_canvas)
        if not self.resize_to_max_canvas:  # never upscale past the tile size
            limit = (min(max(image_size[0], size), canvas[0]), min(max(image_size[1], size), canvas[1]))
        else:
            limit = canvas
        new_h, new_w = size_without_distortion(image_size, limit)
        resized = resize_bilinear(image, (max(new_h, 1), max(new_w, 1)))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[2], 0, canvas[0] - resized.shape[1]))  # black
        rows, cols = canvas[0] // size, canvas[1] // size
        tiles = self._normalize(padded).view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, size, size)  # row-major tiles (split_to_tiles)
        if rows * cols > 1:
            thumbnail = self._normalize(resize_bilinear(image, (size, size)))  # distorted to one tile
            tiles = torch.cat([tiles, thumbnail[None]])
        return ProcessedImage(pixel_values=tiles.contiguous(), aspect_ratio=(rows, cols),
                              prompt=self.prompt_for(rows, cols),
                              num_patch_tokens=tiles.shape[0] * self.tokens_per_tile)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Rescale and normalise in bfloat16, op by op as Llama4ImageProcessor.rescale_and_normalize."""
        x = image.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def prompt_for(self, rows: int, cols: int) -> str:
        """Llama4Processor._prompt_split_image for a (rows, cols) tile grid."""
        patches = PATCH_TOKEN * self.tokens_per_tile
        text = START_TOKEN
        if rows * cols > 1:
            for _ in range(rows):
                text += TILE_X_SEPARATOR.join([patches] * cols) + TILE_Y_SEPARATOR
        return text + IMAGE_TOKEN + patches + END_TOKEN

    @staticmethod
    def expand_prompt(text: str, images: list[ProcessedImage]) -> str:
        """Replace the i-th `<|image|>` of a chat-templated prompt with images[i].prompt (as Llama4Processor)."""
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholders but {len(images)} images "
                             "were given; each image needs exactly one")
        return parts[0] + "".join(img.prompt + part for img, part in zip(images, parts[1:]))
