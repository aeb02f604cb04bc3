"""A data-plane actor SIGKILLed during a streaming HTTP request through the real `llama4serve serve` command:
the engine replaces the actor, the client's stream pauses and completes with the text of a failure-free run,
and the server stays healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from serve_helpers import free_port, start_serve_command

MODEL = "tiny-maverick"


def _stream(port: int, body: dict, on_chunk=None) -> tuple[list[str], bool]:
    """The text of each streamed chunk and whether `[DONE]` came; on_chunk(i) is called after chunk i."""
    texts, done = [], False
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            texts += [c["text"] for c in event["choices"]]
            if on_chunk is not None:
                on_chunk(len(texts))
    return texts, done


def _actor_pid(server: psutil.Process, cls: str) -> int:
    """A Ray worker process of the server's own local cluster that hosts an actor of class `cls`."""
    for proc in server.children(recursive=True):
        try:
            if cls in " ".join(proc.cmdline()):
                return proc.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no {cls} process under the server (pid {server.pid})")


def _session_logs(server: psutil.Process) -> str:
    """Everything the server's own Ray cluster logged (its raylet names the session directory)."""
    for proc in server.children(recursive=True):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        for arg in args:
            if arg.startswith("--session_dir="):
                logs = Path(arg.split("=", 1)[1]) / "logs"
                return "\n".join(f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file()
                                 and f.suffix in (".log", ".err", ".out"))
    raise AssertionError(f"no raylet under the server (pid {server.pid})")


def test_stream_survives_a_killed_expert_actor(tmp_path):
    http_port, grpc_port, dashboard_port = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"preset: {MODEL}\ncache_dir: {tmp_path}\nmax_model_len: 512\ndtype: float32\n"
                      "expert_actors: 2\ncollective_timeout_s: 30\n")
    log = open(tmp_path / "serve.log", "w+")
    proc = start_serve_command(config, log, http_port, grpc_port, dashboard_port)
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stream": True,
                "ignore_eos": True}
        expected, done = _stream(http_port, body)
        assert done and len(expected) == 60
        victim = _actor_pid(psutil.Process(proc.pid), "ExpertShardActor")
        killed_at: list[float] = []

        def kill_after_a_few(n: int) -> None:
            if n == 5:
                os.kill(victim, signal.SIGKILL)
                killed_at.append(time.monotonic())
            elif len(killed_at) == 1 and n == 6:
                killed_at.append(time.monotonic())  # the first chunk after the kill

        texts, done = _stream(http_port, body, kill_after_a_few)
        assert done and texts == expected
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
        assert len(killed_at) == 2 and killed_at[1] - killed_at[0] < 60
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
        assert "replaced expert-" in _session_logs(psutil.Process(proc.pid))  # the recovery's log line
        again, done = _stream(http_port, body)
        assert done and again == expected
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
