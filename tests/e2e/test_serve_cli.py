"""`llama4serve serve` as users run it: a subprocess with its own local Ray cluster, a YAML config plus flags,
a real request, and a clean exit on Ctrl-C."""

from __future__ import annotations

import signal

import httpx

from serve_helpers import free_port, listening_hosts, start_serve_command


def test_serve_command_serves_until_ctrl_c(tmp_path):
    http_port, grpc_port, dashboard_port = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"preset: tiny-scout\ncache_dir: {tmp_path}\nmax_model_len: 512\nhttp_port: 1\n")
    log = open(tmp_path / "serve.log", "w+")
    proc = start_serve_command(config, log, http_port, grpc_port, dashboard_port)
    try:
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny-scout"]
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                           json={"model": "tiny-scout", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5, reply.text
        # --host (default 127.0.0.1) binds the gRPC proxy as well as the HTTP one
        for port in (http_port, grpc_port):
            assert listening_hosts(port) and listening_hosts(port) <= {"127.0.0.1", "::ffff:127.0.0.1"}, port
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        log.seek(0)
        output = log.read()
        assert f"http://127.0.0.1:{http_port}/v1" in output and f"127.0.0.1:{grpc_port}" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
