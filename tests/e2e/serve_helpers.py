"""Helpers of the real-server tests: free ports, which addresses a port listens on, Serve's log files."""

from __future__ import annotations

import socket
import struct
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hex_address(text: str) -> str:
    """A /proc/net/tcp{,6} address (little-endian 32-bit words) as text: 0100007F -> 127.0.0.1."""
    raw = b"".join(struct.pack("<I", int(text[i:i + 8], 16)) for i in range(0, len(text), 8))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening_hosts(port: int) -> set[str]:
    """The local addresses on which some process of this machine listens on TCP `port` (Linux /proc)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.add(_hex_address(address))
    return hosts


def non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (the one Ray uses for the node), if it has one."""
    import ray

    ip = ray.util.get_node_ip_address()
    return None if ip.startswith("127.") or ip == "::1" else ip


def serve_logs_dir() -> Path:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API for the session directory
    session = Path(node.get_session_dir_path()) if node is not None else Path("/tmp/ray/session_latest")
    return session / "logs" / "serve"


def log_offsets() -> dict[Path, int]:
    """Sizes of Serve's log files now; `logs_since` returns what was written after."""
    return {p: p.stat().st_size for p in serve_logs_dir().glob("*.log")}


def logs_since(offsets: dict[Path, int]) -> dict[str, str]:
    out = {}
    for path in serve_logs_dir().glob("*.log"):
        with open(path, "rb") as f:
            f.seek(offsets.get(path, 0))
            out[path.name] = f.read().decode("utf-8", "replace")
    return out


def start_serve_command(config: Path, log, http_port: int, grpc_port: int, dashboard_port: int,
                        timeout_s: float = 240):
    """`llama4serve serve --config config` as a subprocess, writing to `log`; returns it once /health answers 200
    (AssertionError with its output if it does not within timeout_s). The caller stops it."""
    import subprocess
    import sys
    import time

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "llama4serve.cluster.cli.main", "serve", "--config", str(config),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--dashboard-port", str(dashboard_port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline, healthy = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline and proc.poll() is None and not healthy:
        try:
            healthy = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            time.sleep(1)
    if not healthy:
        proc.kill()
        log.seek(0)
        raise AssertionError(f"server did not come up; its output:\n{log.read()[-4000:]}")
    return proc
