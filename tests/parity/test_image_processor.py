"""Image preprocessing against transformers' Llama 4 processor: tile grids, pixel values and prompt expansion.

transformers' Llama4ImageProcessor imports torchvision, which has no CPU build here. Where torchvision is
missing, `_reference_processor` runs transformers' own Llama 4 processor code with its four torchvision
primitives (resize, pad, normalize, grayscale_to_rgb) written in torch the way torchvision computes them; the
grid choice, resizing targets, padding, bfloat16 normalisation, tiling, global tile and prompt layout are
transformers' code. A fixed table of grids derived from that code guards the grid choice without it.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.inputs.image_processor import (ImageProcessor, best_fit_canvas, resize_bilinear,
                                                 supported_resolutions)
from llama4serve.cluster.inputs.tokenizer import Tokenizer

Image = pytest.importorskip("PIL.Image")
np = pytest.importorskip("numpy")

# (height, width) -> (tile rows, tile columns) for 336 px tiles and max_patches 16 (the released settings),
# derived from get_best_fit / find_supported_resolutions in image_processing_llama4.py.
RELEASED_GRIDS = {
    (336, 336): (1, 1), (100, 100): (1, 1), (2, 2): (1, 1), (337, 337): (2, 2), (500, 300): (2, 1),
    (300, 500): (1, 2), (1000, 200): (3, 1), (200, 1000): (1, 3), (4000, 100): (12, 1), (768, 1024): (3, 4),
    (1080, 1920): (3, 5), (1920, 1080): (5, 3), (5000, 5000): (4, 4), (700, 1000): (3, 3),
}
# Sizes for the pixel-level comparison on the tiny preset's 56 px tiles: tall, wide, square, tiny, large, odd.
SIZES = {"tall": (100, 37), "wide": (30, 200), "square": (56, 56), "square-big": (300, 300), "tiny": (3, 2),
         "large": (1000, 700), "panorama": (50, 900), "odd": (57, 113)}


def _image(height: int, width: int, mode: str = "RGB", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 4), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGBA").convert(mode)


def _png(img, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kwargs.pop("format", "PNG"), **kwargs)
    return buf.getvalue()


# -- the reference ---------------------------------------------------------------------------------------------

# Run in a fresh interpreter so the stand-in is in place before transformers first looks for torchvision.
_REFERENCE_SCRIPT = r"""
import enum, importlib.machinery, io, sys, types
import torch
import torch.nn.functional as F


def stand_in():
    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"; NEAREST_EXACT = "nearest-exact"; BILINEAR = "bilinear"; BICUBIC = "bicubic"
        BOX = "box"; HAMMING = "hamming"; LANCZOS = "lanczos"

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True, **_):
        # torchvision.transforms.v2.functional.resize_image for uint8 CPU input, bilinear, antialias
        assert interpolation == InterpolationMode.BILINEAR and antialias and image.dtype == torch.uint8
        if tuple(size) == tuple(image.shape[-2:]):
            return image
        x = image.reshape(-1, *image.shape[-3:])
        if "AVX2" in torch.backends.cpu.get_cpu_capability():
            out = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
        else:
            out = F.interpolate(x.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
            out = out.round_().to(torch.uint8)
        return out.reshape(*image.shape[:-2], *out.shape[-2:])

    def pad(image, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = padding
        assert padding_mode == "constant" and set([fill] if isinstance(fill, int) else fill) == {0}
        return F.pad(image, (left, right, top, bottom), value=0)

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

    def grayscale_to_rgb(image):
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image

    names = ["torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__file__ = "<stand-in for " + name + ">"
    modules["torchvision"].__version__ = "0.0"
    functional = modules["torchvision.transforms.v2.functional"]
    for fn in (resize, pad, normalize, grayscale_to_rgb):
        setattr(functional, fn.__name__, fn)
    functional.InterpolationMode = modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms.functional"].pil_to_tensor = None
    modules["torchvision"].io = modules["torchvision.io"]
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].v2 = modules["torchvision.transforms.v2"]
    modules["torchvision.transforms.v2"].functional = functional
    sys.modules.update(modules)


try:
    import torchvision  # noqa: F401
except ImportError:
    stand_in()
from PIL import Image
from transformers import AutoProcessor
from transformers.image_utils import SizeDict

model_dir, requests_path, out_path = sys.argv[1:]
processor = AutoProcessor.from_pretrained(model_dir)
module = sys.modules[type(processor.image_processor).__module__]
results = []
for kind, *args in torch.load(requests_path):
    if kind == "resolutions":
        max_patches, size = args
        size = SizeDict(height=size, width=size)
        results.append([tuple(r) for r in module.find_supported_resolutions(max_patches, size)])
        continue
    images = [Image.open(io.BytesIO(data)) for data in args[-1]]
    out = processor.image_processor(images=images, return_tensors="pt") if kind == "images" else \
        processor(text=args[0], images=images, return_tensors="pt")
    results.append({k: v for k, v in out.items()})
torch.save(results, out_path)
"""


def _reference(model_dir, requests: list[tuple], tmp_path) -> list:
    """transformers' Llama4Processor, loaded from the checkpoint's processor files, answers `requests`:
    ("resolutions", max_patches, size), ("images", [bytes]) or ("text", text, [bytes])."""
    import subprocess

    torch.save(requests, tmp_path / "requests.pt")
    run = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(model_dir), str(tmp_path / "requests.pt"),
                          str(tmp_path / "results.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "results.pt")


def _fixed_images() -> dict[str, bytes]:
    images = {name: _png(_image(h, w, seed=h * 7 + w)) for name, (h, w) in SIZES.items()}
    images |= {f"mode-{mode}": _png(_image(70, 90, mode=mode, seed=3)) for mode in ("RGBA", "L", "P", "LA")}
    images |= {f"format-{fmt}": _png(_image(120, 80, seed=5), format=fmt, quality=90) for fmt in ("JPEG", "WEBP")}
    return images


PROMPTS = {"two": ("Compare <|image|> and <|image|>.", ["tall", "square"]),
           "three": ("<|image|><|image|>x<|image|>", ["tall", "square", "large"])}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck"), "tiny-scout")


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """Everything the tests compare with, from one run of the reference: {key: output}."""
    images = _fixed_images()
    requests = {"resolutions": [("resolutions", m, s) for m, s in ((16, 336), (5, 224), (16, 56))]}
    requests |= {name: ("images", [data]) for name, data in images.items()}
    requests |= {f"prompt-{k}": ("text", text, [images[n] for n in names]) for k, (text, names) in PROMPTS.items()}
    flat = [requests["resolutions"][i] for i in range(3)] + [v for k, v in requests.items() if k != "resolutions"]
    results = _reference(checkpoint, flat, tmp_path_factory.mktemp("reference"))
    keys = [k for k in requests if k != "resolutions"]
    return {"resolutions": results[:3], **dict(zip(keys, results[3:]))}, images


@pytest.fixture(scope="module")
def ours(checkpoint):
    return ImageProcessor.from_dir(checkpoint)


# -- grids ----------------------------------------------------------------------------------------------------


def test_released_grid_table():
    processor = ImageProcessor(tile_size=336, patch_size=14)
    assert processor.tokens_per_tile == 144
    resolutions = supported_resolutions(16, 336)
    for (height, width), grid in RELEASED_GRIDS.items():
        canvas = best_fit_canvas((height, width), resolutions)
        assert (canvas[0] // 336, canvas[1] // 336) == grid, (height, width)


def test_supported_resolutions_match_reference(reference):
    ref, _ = reference
    for (max_patches, size), expected in zip(((16, 336), (5, 224), (16, 56)), ref["resolutions"]):
        assert list(supported_resolutions(max_patches, size)) == expected


def test_resize_is_within_one_level_of_pillow():
    img = _image(97, 131)
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    for size in ((40, 56), (56, 56), (200, 270)):
        pil = torch.from_numpy(np.array(img.resize(size[::-1], Image.BILINEAR)))
        diff = (resize_bilinear(tensor, size).permute(1, 2, 0).int() - pil.int()).abs()
        assert diff.max() <= 1, size


# -- pixels and prompts against transformers' processor -------------------------------------------------------


def _check_same(mine, ref) -> None:
    assert mine.aspect_ratio == tuple(ref["aspect_ratios"][0].tolist())
    assert mine.pixel_values.dtype == ref["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(mine.pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("name", sorted(SIZES))
def test_tiles_match_reference(reference, ours, name):
    """Tall, wide, square, tiny, large: grid, every pixel value (bitwise) and the token count."""
    ref, images = reference
    mine = ours.process(images[name])
    _check_same(mine, ref[name])
    assert mine.num_patch_tokens == mine.pixel_values.shape[0] * ours.tokens_per_tile
    assert (mine.pixel_values.shape[0] > 1) == (mine.aspect_ratio != (1, 1))  # global tile only with a grid


@pytest.mark.parametrize("name", ["mode-RGBA", "mode-L", "mode-P", "mode-LA", "format-JPEG", "format-WEBP"])
def test_modes_and_formats_match_reference(reference, ours, name):
    ref, images = reference
    _check_same(ours.process(images[name]), ref[name])


@pytest.mark.parametrize("key", sorted(PROMPTS))
def test_prompt_expansion_matches_reference(reference, ours, checkpoint, key):
    """Whole prompts with two and three images of different grids: the same token ids as Llama4Processor."""
    ref, images = reference
    ref = ref[f"prompt-{key}"]
    text, names = PROMPTS[key]
    tokenizer = Tokenizer.from_dir(checkpoint)
    processed = [ours.process(images[name], index=i) for i, name in enumerate(names)]
    expanded = ImageProcessor.expand_prompt(text, processed)
    assert tokenizer.encode(expanded) == ref["input_ids"][0].tolist()  # both add <|begin_of_text|>
    assert torch.equal(torch.cat([p.pixel_values for p in processed]), ref["pixel_values"])
    patch = tokenizer.token_to_id("<|patch|>")
    assert ref["input_ids"][0].tolist().count(patch) == sum(p.num_patch_tokens for p in processed)
    for one in processed:
        assert tokenizer.encode(one.prompt, add_special_tokens=False) == one.token_ids(tokenizer.token_to_id)


def test_prompt_layout():
    processor = ImageProcessor(tile_size=56, patch_size=14)
    p = "<|patch|>" * 4
    assert processor.prompt_for(1, 1) == f"<|image_start|><|image|>{p}<|image_end|>"
    assert processor.prompt_for(2, 3) == ("<|image_start|>" + (f"{p}<|tile_x_separator|>{p}<|tile_x_separator|>{p}"
                                                              "<|tile_y_separator|>") * 2
                                          + f"<|image|>{p}<|image_end|>")
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders but 1 images"):
        ImageProcessor.expand_prompt("<|image|><|image|>", [None])


# -- settings and bad input -----------------------------------------------------------------------------------


def test_settings_come_from_the_checkpoint(checkpoint, tmp_path):
    ours = ImageProcessor.from_dir(checkpoint)
    assert (ours.tile_size, ours.patch_size, ours.max_patches, ours.tokens_per_tile) == (56, 14, 16, 4)
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())  # vision_config only
    fallback = ImageProcessor.from_dir(tmp_path, max_pixels=1000)
    assert (fallback.tile_size, fallback.patch_size, fallback.max_pixels) == (56, 14, 1000)


def test_bad_images_say_which_and_why(ours):
    good = _png(_image(40, 40))
    with pytest.raises(ValueError, match="image 2: the PNG data is corrupt or truncated"):
        ours.process(good[: len(good) // 2], index=2)
    with pytest.raises(ValueError, match="image 1: 1x1 pixels is too small"):
        ours.process(_png(_image(1, 1)), index=1)
    big = ImageProcessor(tile_size=56, patch_size=14, max_pixels=10_000)
    with pytest.raises(ValueError, match="image 0: 200x100 = 20000 pixels is over the limit of 10000"):
        big.process(_png(_image(100, 200)))
    with pytest.raises(ValueError, match="image 3: not a PNG, JPEG or WebP image \\(it looks like GIF\\)"):
        ours.process(_png(_image(20, 20), format="GIF"), index=3)
    with pytest.raises(ValueError, match="image 0: not a PNG, JPEG or WebP image \\(its bytes are not"):
        ours.process(b"hello, this is text")
    with pytest.raises(ValueError, match="over the limit of 100 bytes"):
        ImageProcessor(tile_size=56, patch_size=14, max_bytes=100).process(good)


def test_huge_image_is_refused_before_decoding(ours):
    """A 20 000 x 20 000 PNG (a decompression bomb: small file, 400 M pixels) fails on its header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")
    with pytest.raises(ValueError, match="image 4: .*400000000 pixels.* limit"):
        ours.process(png, index=4)
