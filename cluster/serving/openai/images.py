"""Chat messages of the OpenAI API -> engine messages, with `image_url` parts decoded from base64 data URLs.

Only `data:image/{png,jpeg,webp};base64,...` URLs are accepted (the shared image rules of both protocols are in
`cluster/serving/images.py`). The image bytes go to the engine as `{"type": "image", "image": bytes}` parts;
decoding, size limits and tiling happen there (`cluster/inputs/prompts.py`), with errors naming the same
`messages[i].content[j]` part.
"""

from __future__ import annotations

from llama4serve.cluster.serving.images import check_image_count, image_from_data_url
from llama4serve.cluster.serving.openai.protocol import ChatMessage, ImageURLPart


def engine_messages(messages: list[ChatMessage], max_images: int, max_image_bytes: int) -> list[dict]:
    """The engine's form of `messages`; ServingError (BAD_INPUT) naming the part for a refused image."""
    check_image_count(sum(m.num_images() for m in messages), max_images)
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        extra = {k: v for k in ("tool_calls", "tool_call_id") if (v := getattr(message, k)) is not None}
        if not isinstance(message.content, list):
            out.append({"role": role, "content": message.content or "", **extra})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if isinstance(part, ImageURLPart):
                where = f"messages[{i}].content[{j}]"
                parts.append({"type": "image", "image": image_from_data_url(part.image_url.url, where,
                                                                              max_image_bytes)})
            else:
                parts.append(part.model_dump())
        out.append({"role": role, "content": parts, **extra})
    return out
