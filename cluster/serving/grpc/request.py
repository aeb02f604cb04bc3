"""A GenerateRequest -> (engine prompt, SamplingParams), checked against the serving limits (`limits.py`) that
the OpenAI HTTP API also enforces, so the same bad value gets the same message over both protocols.

Every problem raises `ServingError(BAD_INPUT, ...)` naming the field: `temperature`, `messages[0].role`,
`images[0].data`, `token_ids.ids[1]`.
"""

from __future__ import annotations

from typing import Any

from llama4serve.protos import llama4serve_pb2 as pb
from llama4serve.cluster.serving import images, limits
from llama4serve.cluster.serving.policy import BAD_INPUT, ServingError
from llama4serve.cluster.sampling_params import SamplingParams

# GenerateRequest fields with presence that map 1:1 onto SamplingParams, all in limits.SAMPLING.
_OPTIONAL_PARAMS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)


def _bad(message: str) -> ServingError:
    return ServingError(BAD_INPUT, message)


def _check(where: str, problem: limits.Problem | None) -> None:
    if problem is not None:
        raise _bad(problem.at(where))


def parse_request(request: pb.GenerateRequest, max_model_len: int,
                  max_images: int | None = None) -> tuple[Any, SamplingParams]:
    """The engine prompt and sampling parameters of `request`; ServingError naming the field when bad.
    `max_images`: max_images_per_request (the engine also enforces it)."""
    prompt = prompt_of(request)
    images.check_image_count(_num_images(request), max_images, "images" if request.images else "messages")
    return prompt, sampling_params(request, max_model_len)


def _num_images(request: pb.GenerateRequest) -> int:
    parts = sum(part.WhichOneof("part") == "image" for message in request.messages for part in message.parts)
    return len(request.images) + parts


def prompt_of(request: pb.GenerateRequest) -> str | list[int] | list[dict] | dict:
    kind = request.WhichOneof("prompt")
    if kind and request.messages:
        raise _bad(f"GenerateRequest has both {kind} and messages; set exactly one of text, token_ids, messages")
    if request.images and not kind:
        raise _bad("images go with a text or token_ids prompt; put the images of chat messages in their parts")
    if request.images:
        prompt = request.text if kind == "text" else _token_ids(request)
        images = [_image_bytes(image, f"images[{k}]") for k, image in enumerate(request.images)]
        return {"prompt": prompt, "images": images}
    if kind == "text":
        return request.text
    if kind == "token_ids":
        return _token_ids(request)
    if not request.messages:
        raise _bad("GenerateRequest has no input; set one of text, token_ids, messages")
    messages = []
    for i, message in enumerate(request.messages):
        _check(f"messages[{i}].role", limits.role_problem(message.role))
        if message.content and message.parts:
            raise _bad(f"messages[{i}] has both content and parts; set one of them")
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": _content(message, i) if message.parts else message.content})
    return messages


def _content(message: pb.ChatMessage, index: int) -> list[dict]:
    parts = []
    for j, part in enumerate(message.parts):
        kind = part.WhichOneof("part")
        if kind == "image":
            parts.append({"type": "image", "image": _image_bytes(part.image, f"messages[{index}].parts[{j}]")})
        elif kind == "text":
            parts.append({"type": "text", "text": part.text})
        else:
            raise _bad(f"messages[{index}].parts[{j}] is empty; set text or image")
    return parts


def _image_bytes(image: pb.Image, where: str) -> bytes:
    return images.image_bytes(image.data, image.mime_type, where)


def _token_ids(request: pb.GenerateRequest) -> list[int]:
    ids = list(request.token_ids.ids)
    if not ids:
        raise _bad("token_ids.ids is empty; send at least one token id")
    _check("token_ids.ids", limits.token_ids_problem(ids))
    return ids


def sampling_params(request: pb.GenerateRequest, max_model_len: int) -> SamplingParams:
    kwargs: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_PARAMS if request.HasField(name)}
    for name, value in kwargs.items():
        _check(name, limits.SAMPLING[name].problem(value))
    if "max_tokens" in kwargs:
        _check("max_tokens", limits.deployment_limit(kwargs["max_tokens"], max_model_len, "max_model_len",
                                                     "prompt included"))
    stop = list(request.stop)
    _check("stop", limits.stop_problem(stop))
    _check("stop_token_ids", limits.token_ids_problem(list(request.stop_token_ids)))
    try:
        return SamplingParams(stop=stop, stop_token_ids=list(request.stop_token_ids),
                              prompt_logprobs=request.prompt_logprobs, ignore_eos=request.ignore_eos,
                              structured_outputs=_structured_outputs(request), **kwargs)
    except ValueError as e:
        raise _bad(str(e).removeprefix("SamplingParams.")) from None


def _structured_outputs(request: pb.GenerateRequest) -> dict | None:
    """vLLM's structured_outputs mapping of the request (SamplingParams checks it; the engine compiles it)."""
    if not request.HasField("structured_outputs"):
        return None
    so = request.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise _bad("structured_outputs is empty; set one of json, json_object, regex, choice, grammar")
    if kind == "choice":
        return {"choice": list(so.choice.choices)}
    return {kind: getattr(so, kind)}
