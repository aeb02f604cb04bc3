"""FakeTensorMode with "cuda" tensors on a CPU-only torch build (a test helper, not a test).

On a CPU-only build, FakeTensorMode can create device="cuda" fake tensors, but any op whose C++ entry takes a
CUDA device guard fails with "PyTorch is not linked with support for cuda devices": every Python indexing or
slicing (`x[i]`, `x[:, None]`, `x[a:b]`, setitem), SDPA, `.to("cuda")`, and so flex_attention's block-mask
helpers. `fake_cuda_mode()` first registers a no-op CUDA device guard (c10's NoOpDeviceGuardImpl, a 1-2 s g++
build, cached per torch version) and then returns a FakeTensorMode; with it those ops run on fake tensors,
while device mismatches, `.item()`, `.tolist()`, `nonzero` and other data-dependent ops still raise, and real
CUDA use (`torch.zeros(1, device="cuda")` outside the mode) still fails as before.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from functools import cache

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

_GUARD_SOURCE = """
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);
}
"""


@cache
def _register_noop_cuda_guard() -> None:
    if torch.backends.cuda.is_built():
        return  # a CUDA build has the real guard
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("FakeTensorMode 'cuda' checks need g++ to build a no-op CUDA device guard on a CPU-only torch")
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    out = os.path.join(tempfile.gettempdir(), f"llama4serve-noop-cuda-guard-{torch.__version__}-{os.getuid()}.so")
    if not os.path.exists(out):
        src, tmp = f"{out[:-3]}.{os.getpid()}.cpp", f"{out}.{os.getpid()}"  # concurrent builders do not collide
        with open(src, "w") as f:
            f.write(_GUARD_SOURCE)
        cmd = [compiler, "-shared", "-fPIC", "-std=c++17", *(f"-I{p}" for p in include_paths()), src,
               f"-L{lib_dir}", "-lc10", f"-Wl,-rpath,{lib_dir}", "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
        os.remove(src)
    ctypes.CDLL(out)


def fake_cuda_mode() -> FakeTensorMode:
    """A FakeTensorMode in which device="cuda" tensors can be indexed on this CPU-only machine."""
    _register_noop_cuda_guard()
    return FakeTensorMode()
