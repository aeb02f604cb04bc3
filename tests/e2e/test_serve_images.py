"""Images through the real Serve app: the `openai` client sends base64 PNGs in chat content parts and gets the
same greedy output as `LLM.generate`; gRPC sends the image bytes; bad images get 4xx / INVALID_ARGUMENT naming
the part, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import socket

import grpc
import pytest
import torch
from openai import BadRequestError, OpenAI

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc

Image = pytest.importorskip("PIL.Image")

MODEL = "tiny-maverick"
QUESTION = "What is in these pictures?"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    if mode == "RGB":
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    else:  # a huge blank image compresses to a few kilobytes
        Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


IMAGES = [_png(120, 60, seed=1), _png(40, 40, seed=2)]


def _chat_content(urls: list[str]) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": QUESTION},
            *({"type": "image_url", "image_url": {"url": u}} for u in urls[1:])]


def _engine_messages(images: list[bytes]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": QUESTION},
                                         *({"type": "image", "image": b} for b in images[1:])]}]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("serve-images") / MODEL, MODEL)
    with LLM(model, dtype="float32") as llm:
        one = llm.generate({"messages": _engine_messages(IMAGES[:1])}, GREEDY)[0]
        two = llm.generate({"messages": _engine_messages(IMAGES)}, GREEDY)[0]
        text = llm.generate({"prompt": "<|image|>" + QUESTION, "images": IMAGES[:1]}, GREEDY)[0]
    config = ServeConfig(model=str(model), dtype="float32", http_port=_free_port(), grpc_port=_free_port(),
                         max_model_len=1024, max_images_per_request=3)
    start_serve(config)
    yield config, {"one": one, "two": two, "text": text}
    serve.delete(APP_NAME)
    serve.shutdown()


def _client(config: ServeConfig) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="unused", max_retries=0)


def _chat(client: OpenAI, content: list[dict], **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=GREEDY.max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True}, **kwargs)


@pytest.mark.parametrize("count", ["one", "two"])
def test_openai_chat_with_images_matches_llm_generate(server, count):
    config, expected = server
    images = IMAGES[:1] if count == "one" else IMAGES
    out = _chat(_client(config), _chat_content([_data_url(b) for b in images]))
    assert out.choices[0].message.content == expected[count].text
    assert out.usage.prompt_tokens == len(expected[count].prompt_token_ids)
    assert out.usage.completion_tokens == GREEDY.max_tokens


TRUNCATED = IMAGES[0][: len(IMAGES[0]) // 2]
BAD_IMAGES = [
    ("truncated png", _data_url(TRUNCATED), ["corrupt or truncated"]),
    ("1x1 image", _data_url(_png(1, 1)), ["1x1", "too small"]),
    ("20000x20000 image", _data_url(_png(20_000, 20_000, mode="1")), ["pixels"]),
    ("wrong mime", "data:text/plain;base64," + base64.b64encode(b"hello").decode(), ["text/plain", "image/png"]),
    ("gif bytes", _data_url(b"GIF89a" + bytes(40), "image/png"), ["GIF"]),
    ("http url", "http://example.com/cat.png", ["not fetched", "data:image/png;base64"]),
    ("bad base64", "data:image/png;base64,@@@@", ["base64"]),
]


@pytest.mark.parametrize("case, url, words", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_are_400_naming_the_part(server, case, url, words):
    config, expected = server
    client = _client(config)
    with pytest.raises(BadRequestError) as info:
        _chat(client, _chat_content([_data_url(IMAGES[0]), url]))  # the bad image is content part 2
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error", error
    assert error["param"] == "messages[0].content[2]", error
    assert error["message"].startswith("messages[0].content[2]: ")
    for word in words:
        assert word in error["message"], error["message"]
    good = _chat(client, _chat_content([_data_url(IMAGES[0])]))  # the server keeps serving
    assert good.choices[0].message.content == expected["one"].text


def test_too_many_images_are_refused(server):
    config, _ = server
    with pytest.raises(BadRequestError, match=r"4 images.*at most 3 \(max_images_per_request\)"):
        _chat(_client(config), _chat_content([_data_url(IMAGES[1])] * 4))


def _stub(config: ServeConfig) -> pb_grpc.Llama4ServeStub:
    return pb_grpc.Llama4ServeStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))


def _image_parts(images: list[bytes]) -> list[pb.ContentPart]:
    parts = [pb.ContentPart(image=pb.Image(data=images[0], mime_type="image/png")), pb.ContentPart(text=QUESTION)]
    return parts + [pb.ContentPart(image=pb.Image(data=b)) for b in images[1:]]


def test_grpc_images_give_the_same_tokens(server):
    config, expected = server
    stub = _stub(config)
    chat = stub.Generate(pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", parts=_image_parts(IMAGES))], max_tokens=GREEDY.max_tokens,
        temperature=0, ignore_eos=True), timeout=120)
    assert list(chat.token_ids) == expected["two"].token_ids
    assert list(chat.prompt_token_ids) == expected["two"].prompt_token_ids
    text = stub.Generate(pb.GenerateRequest(
        text="<|image|>" + QUESTION, images=[pb.Image(data=IMAGES[0])], max_tokens=GREEDY.max_tokens,
        temperature=0, ignore_eos=True), timeout=120)
    assert list(text.token_ids) == expected["text"].token_ids


@pytest.mark.parametrize("request_, words", [
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", parts=_image_parts([TRUNCATED]))]),
     ["messages[0].parts[0]: ", "corrupt or truncated"]),
    (pb.GenerateRequest(text="<|image|><|image|>", images=[pb.Image(data=IMAGES[0]), pb.Image(data=_png(1, 1))]),
     ["images[1]: ", "too small"]),
    (pb.GenerateRequest(text="<|image|>", images=[pb.Image(data=IMAGES[0], mime_type="text/plain")]),
     ["images[0].mime_type", "text/plain"]),
    (pb.GenerateRequest(text="no placeholder", images=[pb.Image(data=IMAGES[0])]), ["placeholder"]),
], ids=["truncated chat part", "1x1 image", "wrong mime", "no placeholder"])
def test_grpc_bad_images_are_invalid_argument(server, request_, words):
    config, expected = server
    stub = _stub(config)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in info.value.details(), info.value.details()
    again = stub.Generate(pb.GenerateRequest(text="<|image|>" + QUESTION, images=[pb.Image(data=IMAGES[0])],
                                             max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True),
                          timeout=120)
    assert list(again.token_ids) == expected["text"].token_ids
