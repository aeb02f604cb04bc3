"""The checked-in gRPC stubs match protos/llama4serve.proto, and the service has the shape clients rely on."""

import importlib.util
import pickle
from importlib.metadata import version
from pathlib import Path

import pytest

from llama4serve.protos import llama4serve_pb2 as pb
from llama4serve.protos import llama4serve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the `test` extra")
    made_with = pb_grpc.GRPC_GENERATED_VERSION
    assert version("grpcio-tools") == made_with, (
        f"the stubs were generated with grpcio-tools {made_with}, but {version('grpcio-tools')} is installed: "
        f"pip install grpcio-tools=={made_with} (or regenerate with the new version and bump the pin)"
    )
    for fresh in _generator().generate(tmp_path):
        checked_in = ROOT / "protos" / fresh.name
        assert checked_in.read_text() == fresh.read_text(), (
            f"protos/{fresh.name} is stale: run `python scripts/gen_protos.py` after editing protos/llama4serve.proto"
        )


def test_messages_pickle_under_the_package_module_path():
    # Ray Serve's gRPC proxy pickles each request message to hand it to the replica.
    assert pb.GenerateRequest.__module__ == "llama4serve.protos.llama4serve_pb2"
    assert pb_grpc.llama4serve_dot_protos_dot_llama4serve__pb2 is pb
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), temperature=0.0)
    assert pickle.loads(pickle.dumps(request)) == request


def test_service_is_versioned_with_unary_and_streaming_methods():
    service = pb.DESCRIPTOR.services_by_name["Llama4Serve"]
    assert service.full_name == "llama4serve.v1.Llama4Serve"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", False),
        "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
    }
    assert callable(pb_grpc.add_Llama4ServeServicer_to_server)


def test_unset_sampling_fields_are_distinguishable_from_zero():
    request = pb.GenerateRequest(text="hi", temperature=0.0, max_tokens=0)
    assert request.HasField("temperature") and request.temperature == 0
    assert request.HasField("max_tokens")
    for name in ("top_p", "top_k", "seed", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        assert not request.HasField(name), name
    decoded = pb.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.HasField("temperature") and not decoded.HasField("seed")


def test_prompt_is_one_of_text_or_token_ids():
    request = pb.GenerateRequest(text="hi")
    request.token_ids.ids.extend([1, 2, 3])
    assert request.WhichOneof("prompt") == "token_ids"
    assert request.text == ""
