"""Prompts -> token ids (and image tiles): text, token ids, chat messages, and prompts with images.

Accepted forms (`Prompt`):
- a string, or a list of token ids;
- chat messages `[{"role": ..., "content": str | [parts]}]`, parts `{"type": "text", "text": ...}` or
  `{"type": "image", "image": <bytes of a PNG/JPEG/WebP file>}` (the chat template renders `<|image|>` for each),
  assistant messages with OpenAI `tool_calls` and `tool` messages;
- a dict `{"prompt": str | list[int], "images": [bytes, ...]}` whose prompt holds one `<|image|>` placeholder
  (text, or its token id) per image, in order (like vLLM's `multi_modal_data`), or `{"messages": [...]}`, which
  may add OpenAI `tools`, `tool_choice`, `parallel_tool_calls` (rendered as `tool_calls.tool_chat_inputs` says).

Each `<|image|>` is expanded into the image's tile layout (`ImageProcessor`), so the token count that the engine
validates against max_model_len and the KV budget includes every image token. Errors are ValueErrors naming the
image by where it was given: `images[1]`, `messages[0].content[2]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama4serve.cluster.inputs import Prompt
from llama4serve.cluster.inputs.image_processor import IMAGE_TOKEN, ImageProcessor, ProcessedImage
from llama4serve.cluster.inputs.tool_calls import ToolRequest, tool_chat_inputs, validate_tool_request

_DICT_KEYS = {"prompt", "images", "messages", "tools", "tool_choice", "parallel_tool_calls"}
_TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")  # only with "messages" (OpenAI names)


@dataclass
class PromptInputs:
    """A tokenized prompt; with images, their tiles [N, 3, S, S] (prompt order) and the <|patch|> positions."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None
    patch_positions: list[int] = field(default_factory=list)  # one per row of the image features


def is_chat(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def has_images(prompt) -> bool:
    """Whether preparing `prompt` decodes images (worth doing off the event loop)."""
    if isinstance(prompt, dict):
        return bool(prompt.get("images")) or has_images(prompt.get("messages"))
    if is_chat(prompt):
        return any(isinstance(p, dict) and p.get("type") == "image"
                   for m in prompt if isinstance(m.get("content"), list) for p in m["content"])
    return False


class PromptPreparer:
    """Turns prompts into `PromptInputs` for one checkpoint (tokenizer, image settings, limits)."""

    def __init__(self, model_dir: str, tokenizer, image_token_id: int | None, vision_problem: str | None,
                 max_images: int, max_image_bytes: int, max_image_pixels: int):
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id  # <|patch|>
        self.vision_problem = vision_problem  # why this checkpoint takes no images; None when it does
        self.max_images = max_images
        self.limits = dict(max_bytes=max_image_bytes, max_pixels=max_image_pixels)
        self._processor: ImageProcessor | None = None

    def prepare(self, prompt: Prompt) -> PromptInputs:
        if isinstance(prompt, dict):
            unknown = set(prompt) - _DICT_KEYS
            if unknown:
                raise ValueError(f"prompt has unknown keys {sorted(unknown)}; allowed: prompt, images, messages, "
                                 "and with messages tools, tool_choice, parallel_tool_calls")
            if ("prompt" in prompt) == ("messages" in prompt):
                raise ValueError("a dict prompt needs exactly one of 'prompt' and 'messages'")
            if "prompt" in prompt and any(k in prompt for k in _TOOL_KEYS):
                raise ValueError("tools, tool_choice and parallel_tool_calls go with 'messages', not 'prompt'")
            if "messages" in prompt:
                if prompt.get("images"):
                    raise ValueError("images go inside the messages' content parts, not in 'images'")
                tools = validate_tool_request(*(prompt.get(k) for k in _TOOL_KEYS))
                return self._chat(prompt["messages"], tools)
            return self._with_images(prompt["prompt"], list(prompt.get("images") or []))
        if is_chat(prompt):
            return self._chat(prompt)
        return PromptInputs(self._tokenize(prompt))

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt is text but {self.model_dir} has no tokenizer.json; pass token ids instead")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt must be a string, token ids, chat messages or a dict; got {type(prompt).__name__}")
        return list(prompt)

    def _chat(self, messages: list[dict], tools: ToolRequest | None = None) -> PromptInputs:
        if self.tokenizer is None:
            raise ValueError(f"messages need a chat template, but {self.model_dir} has no tokenizer")
        messages, variables = tool_chat_inputs(messages, tools, self.tokenizer.chat_template)
        images, labels, rendered = [], [], []
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if isinstance(part, dict) and part.get("type") == "image":
                        images.append(part.get("image"))
                        labels.append(f"messages[{i}].content[{j}]")
                        part = {"type": "image"}  # the template needs only the type
                    parts.append(part)
                message = dict(message, content=parts)
            rendered.append(message)
        text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, **variables)
        processed = self._process(images, labels)
        if processed:
            text = self._expand(text, processed, "the rendered chat prompt")
        return self._inputs(self.tokenizer.encode(text, add_special_tokens=False), processed)  # template has BOS

    def _with_images(self, prompt: str | list[int], images: list) -> PromptInputs:
        if not images:
            return PromptInputs(self._tokenize(prompt))
        processed = self._process(images, [f"images[{k}]" for k in range(len(images))])
        if isinstance(prompt, str):
            return self._inputs(self._tokenize(self._expand(prompt, processed, "prompt")), processed)
        ids = self._tokenize(prompt)
        placeholder = self.tokenizer.token_to_id(IMAGE_TOKEN)
        found = ids.count(placeholder)
        if found != len(processed):
            raise ValueError(f"prompt has {found} {IMAGE_TOKEN} tokens (id {placeholder}) but {len(processed)} "
                             "images were given; put one placeholder where each image goes")
        out: list[int] = []
        images_left = iter(processed)
        for t in ids:
            out += next(images_left).token_ids(self.tokenizer.token_to_id) if t == placeholder else [t]
        return self._inputs(out, processed)

    @staticmethod
    def _expand(text: str, processed: list[ProcessedImage], what: str) -> str:
        found = text.count(IMAGE_TOKEN)
        if found != len(processed):
            raise ValueError(f"{what} has {found} {IMAGE_TOKEN} placeholders but {len(processed)} images were "
                             "given; each image needs exactly one")
        return ImageProcessor.expand_prompt(text, processed)

    def _process(self, images: list, labels: list[str]) -> list[ProcessedImage]:
        if not images:
            return []
        if self.vision_problem is not None:
            raise ValueError(f"{labels[0]}: this model does not take images ({self.vision_problem})")
        if self.tokenizer is None:
            raise ValueError(f"{labels[0]}: image prompts need the checkpoint's tokenizer; {self.model_dir} has none")
        if len(images) > self.max_images:
            raise ValueError(f"the request has {len(images)} images; this deployment accepts at most "
                             f"{self.max_images} (max_images_per_request)")
        if self._processor is None:
            self._processor = ImageProcessor.from_dir(self.model_dir, **self.limits)
        processed = []
        for index, (data, label) in enumerate(zip(images, labels)):
            try:
                processed.append(self._processor.process(data, index))
            except ValueError as e:
                message = str(e).removeprefix(f"image {index}: ")
                raise ValueError(f"{label}: {message}") from None
        return processed

    def _inputs(self, ids: list[int], processed: list[ProcessedImage]) -> PromptInputs:
        if not processed:
            return PromptInputs(ids)
        positions = [p for p, t in enumerate(ids) if t == self.image_token_id]
        expected = sum(img.num_patch_tokens for img in processed)
        if len(positions) != expected:
            raise ValueError(f"the prompt has {len(positions)} <|patch|> tokens but its images need {expected}; "
                             "do not write <|patch|> or other image tokens in the text")
        return PromptInputs(ids, torch.cat([img.pixel_values for img in processed]), positions)
