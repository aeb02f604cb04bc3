"""Chat messages of the OpenAI API -> engine messages, with `image_url` parts decoded from base64 data URLs.

Only `data:image/{png,jpeg,webp};base64,...` URLs are accepted: the server never fetches from the network. The
image bytes go to the engine as `{"type": "image", "image": bytes}` parts; decoding, size limits and tiling happen
there (`cluster/inputs/prompts.py`), with errors naming the same `messages[i].content[j]` part.
"""

from __future__ import annotations

import base64
import binascii

from llama4serve.cluster.serving.openai.protocol import APIError, ChatMessage, ImageURLPart

IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


def engine_messages(messages: list[ChatMessage], max_images: int, max_image_bytes: int) -> list[dict]:
    """The engine's form of `messages`; APIError 400 naming the part for a refused image."""
    total = sum(m.num_images() for m in messages)
    if total > max_images:
        raise APIError(400, f"the request has {total} images; this server accepts at most {max_images} "
                            "(max_images_per_request)", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            out.append({"role": role, "content": message.content})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if isinstance(part, ImageURLPart):
                where = f"messages[{i}].content[{j}]"
                parts.append({"type": "image", "image": decode_data_url(part.image_url.url, where, max_image_bytes)})
            else:
                parts.append(part.model_dump())
        out.append({"role": role, "content": parts})
    return out


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image data URL; APIError 400 (param `where`) when it is not one or is too large."""
    def refuse(message: str) -> APIError:
        return APIError(400, f"{where}: {message}", param=where)

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
        raise refuse(f"data URL has MIME type {mime or '(none)'!r}; send image/png, image/jpeg or image/webp")
    if "base64" not in fields[1:]:
        raise refuse("data URL must be base64-encoded ('data:image/png;base64,...')")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise refuse(f"the image has about {len(data) * 3 // 4} bytes; this server accepts at most {max_bytes} "
                     "bytes per image (max_image_bytes)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise refuse(f"the data URL's base64 payload is invalid ({e})") from None
