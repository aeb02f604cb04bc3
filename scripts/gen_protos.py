"""Regenerate the Python gRPC stubs in protos/ from protos/llama4serve.proto.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: protos/, in place)
Needs grpcio-tools (the `test` extra pins the version the checked-in stubs were made with).

protoc is run on a copy of the .proto at `llama4serve/protos/llama4serve.proto`, the import path of the
installed package, so the message classes get `__module__ == "llama4serve.protos.llama4serve_pb2"` and the
grpc module imports them from there. Ray Serve's gRPC proxy pickles each request message to send it to the
replica; with the bare `llama4serve_pb2` module name that protoc would otherwise record, unpickling fails.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent.parent / "protos"
PROTO_NAME = "llama4serve"
PACKAGE_PATH = Path("llama4serve") / "protos"  # where `llama4serve.protos` is imported from


def generate(out_dir: Path = PROTOS_DIR) -> list[Path]:
    """Writes {name}_pb2.py, {name}_pb2.pyi and {name}_pb2_grpc.py into out_dir; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    names = [f"{PROTO_NAME}_pb2.py", f"{PROTO_NAME}_pb2.pyi", f"{PROTO_NAME}_pb2_grpc.py"]
    with tempfile.TemporaryDirectory() as tmp:
        source_root, gen_root = Path(tmp) / "src", Path(tmp) / "gen"
        (source_root / PACKAGE_PATH).mkdir(parents=True)
        gen_root.mkdir()
        shutil.copy(PROTOS_DIR / f"{PROTO_NAME}.proto", source_root / PACKAGE_PATH)
        argv = [
            "grpc_tools.protoc",
            f"-I{source_root}",
            f"-I{well_known}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            str(PACKAGE_PATH / f"{PROTO_NAME}.proto"),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS_DIR / (PROTO_NAME + '.proto')}")
        for name in names:
            shutil.copy(gen_root / PACKAGE_PATH / name, out_dir / name)
    return [out_dir / name for name in names]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS_DIR):
        print(path)
