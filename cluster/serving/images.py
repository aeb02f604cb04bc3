"""Images in requests, for both protocols: the accepted MIME types, the per-request count bound, and the bytes
of one image (HTTP: a base64 data URL; gRPC: raw bytes with a MIME type). Decoding, pixel limits and tiling
happen in the engine (`cluster/inputs/prompts.py`), whose errors name the same part (`messages[i].content[j]`).

Every refusal is `ServingError(BAD_INPUT, ..., param=where)`, `where` naming the part. The server never fetches
images from the network.
"""

from __future__ import annotations

import base64
import binascii

from llama4serve.cluster.serving.policy import BAD_INPUT, ServingError

IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
_SEND = "send image/png, image/jpeg or image/webp"


def _refuse(where: str, message: str) -> ServingError:
    return ServingError(BAD_INPUT, message, param=where)


def check_image_count(total: int, max_images: int | None, where: str = "messages") -> None:
    """Refuses more than `max_images` (max_images_per_request) images in one request."""
    if max_images is not None and total > max_images:
        raise _refuse(where, f"the request has {total} images; this server accepts at most {max_images} "
                             "(max_images_per_request)")


def image_bytes(data: bytes, mime_type: str, where: str) -> bytes:
    """Raw image bytes with an optional MIME type (gRPC `Image`): refused when empty or of another type."""
    mime = mime_type.strip().lower()
    if mime and mime not in IMAGE_MIME_TYPES:
        raise _refuse(where, f"{where}.mime_type is {mime_type!r}; {_SEND}")
    if not data:
        raise _refuse(where, f"{where}.data is empty; send the image file's bytes")
    return bytes(data)


def image_from_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image data URL (OpenAI `image_url.url`); refused when it is not one, is remote,
    or is larger than `max_bytes` (max_image_bytes, checked before decoding)."""
    def refuse(message: str) -> ServingError:
        return _refuse(where, f"{where}: {message}")

    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise refuse("remote image URLs are not fetched by this server; send the image inline as "
                     "'data:image/png;base64,...' (PNG, JPEG or WebP)")
    if scheme != "data" or "," not in url:
        raise refuse(f"image_url.url must be a data URL 'data:image/png;base64,...'; got {url[:40]!r}")
    header, data = url[5:].split(",", 1)
    fields = [f.strip().lower() for f in header.split(";")]
    mime = fields[0]
    if mime not in IMAGE_MIME_TYPES:
        raise refuse(f"data URL has MIME type {mime or '(none)'!r}; {_SEND}")
    if "base64" not in fields[1:]:
        raise refuse("data URL must be base64-encoded ('data:image/png;base64,...')")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise refuse(f"the image has about {len(data) * 3 // 4} bytes; this server accepts at most {max_bytes} "
                     "bytes per image (max_image_bytes)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise refuse(f"the data URL's base64 payload is invalid ({e})") from None
