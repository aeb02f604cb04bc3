"""Native CPU kernels: C sources next to this file, compiled once per machine with the system C compiler and
loaded with ctypes. No torch headers are involved, so a build takes about a second.

A library is built into `$LLAMA4SERVE_KERNEL_CACHE` (default `~/.cache/llama4serve/kernels`) under a name
derived from its source and flags, written to a temporary file and renamed, so that actors starting at once on
one machine never load a half-written file. Anything missing (no compiler, a CPU without AVX-512, a failed
build, `LLAMA4SERVE_NATIVE_KERNELS=0`) makes `load` return None and the callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_FLAGS = ["-O3", "-mavx512f", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm"]
_BUILD_TIMEOUT_S = 120.0


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA4SERVE_KERNEL_CACHE") or Path.home() / ".cache" / "llama4serve" / "kernels")


def unavailable_reason() -> str | None:
    """Why native kernels cannot be used in this process, or None when they can."""
    if os.environ.get("LLAMA4SERVE_NATIVE_KERNELS", "1") == "0":
        return "disabled by LLAMA4SERVE_NATIVE_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"the CPU lacks AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler (cc) on PATH"
    return None


def _build(source: Path) -> Path:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=_BUILD_TIMEOUT_S)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for stale in target.parent.glob(f"{source.stem}-*.so"):  # builds of other sources, untouched for a day
        if stale != target and time.time() - stale.stat().st_mtime > 86400:
            stale.unlink(missing_ok=True)  # a process that loaded it keeps its mapping
    return target


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from kernels/<name>.c, or None (with the reason logged once) when unavailable."""
    reason = unavailable_reason()
    if reason is None:
        try:
            return ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.c"))))
        except subprocess.CalledProcessError as err:
            reason = f"build failed: {err.stderr.strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            reason = f"build or load failed: {err}"
    logger.info("native kernel %s not used (%s); falling back to torch", name, reason)
    return None


@cache
def cpu_kernels() -> ctypes.CDLL | None:
    """cpu_kernels.c with its functions' signatures set, or None (callers keep their torch path)."""
    lib = load("cpu_kernels")
    if lib is not None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        signatures = {
            "panel_linear_f32": [ptr, ptr, ptr, ptr, i64, i64, i64],
            "swiglu_f32": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64],
            "rms_norm_f32": [ptr, ptr, ptr, i64, i64, ctypes.c_float],
            # DecodeLayer / DecodeDims structs from actors/runner/fused_decode.py, by address
            "decode_layer_f32": [ptr, ptr, i64, ptr, ptr, ptr, ptr],
            "decode_scratch_floats": [ptr, i64, i64, i64, i64],
            "pack_dispatch_f32": [ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr],
            "serve_blocks_f32": [ptr, i64, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        lib.decode_scratch_floats.restype = lib.serve_blocks_f32.restype = i64
    return lib
