"""`llama4serve serve --address auto` as a Ray Job on a real Ray head with the dashboard: submitted through
JobSubmissionClient, watched through the dashboard's Serve and state APIs, stopped cleanly.

The head is this test's own (`ray start --head --block` with its own temp dir and free ports, in a new session),
so stopping it touches no other Ray cluster on the machine: SIGTERM to that `ray start`, which tears down its
processes; SIGKILL to its process group if it does not.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

APP = "llama4serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except (httpx.HTTPError, ConnectionError, RuntimeError, ValueError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


@pytest.fixture
def ray_head(tmp_path):
    """The dashboard URL of a fresh single-node Ray cluster, stopped at the end."""
    dashboard_port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="l4s-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 turns token auth on for new local clusters; this one listens on 127.0.0.1 only, and the test
    # is about our entrypoint, so its HTTP APIs are left open (no token to hand to the clients).
    env["RAY_AUTH_MODE"] = "disabled"
    log = open(tmp_path / "ray-head.log", "w+")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(_free_port()), "--num-cpus", "8",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        try:
            _wait("the dashboard", lambda: head.poll() is None
                  and httpx.get(f"{url}/api/version", timeout=5).is_success, 90)
        except AssertionError:
            log.seek(0)
            raise AssertionError(f"the Ray head did not come up:\n{log.read()[-4000:]}") from None
        yield url
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of this cluster is left (its own session)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _app_status(url: str) -> str | None:
    apps = httpx.get(f"{url}/api/serve/applications/", timeout=10).json().get("applications", {})
    return apps.get(APP, {}).get("status")


def test_serve_runs_as_a_ray_job_and_stops_cleanly(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    url = ray_head
    http_port, grpc_port = _free_port(), _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"cache_dir: {tmp_path}\nmax_model_len: 512\n")
    cli = ["llama4serve"] if shutil.which("llama4serve") else [sys.executable, "-m", "llama4serve.cluster.cli.main"]
    command = shlex.join(cli)
    client = JobSubmissionClient(url)
    job = client.submit_job(
        entrypoint=f"{command} serve --address auto --preset tiny-scout --attention-actors 1 --expert-actors 1 "
        f"--http-port {http_port} --grpc-port {grpc_port} --config {shlex.quote(str(config))}",
        # Room for the app's deletion between `ray job stop`'s SIGTERM and its SIGKILL (default 3 s).
        runtime_env={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}},
    )

    def running() -> bool:
        status = client.get_job_status(job)
        if status.is_terminal():
            raise AssertionError(f"job ended ({status}):\n{client.get_job_logs(job)[-4000:]}")
        return _app_status(url) == "RUNNING"

    try:
        _wait("the Serve app RUNNING", running, 150, every_s=2)
        deployments = httpx.get(f"{url}/api/serve/applications/", timeout=10).json()["applications"][APP]["deployments"]
        assert set(deployments) == {"Ingress", "Engine"}
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                           json={"model": "tiny-scout", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text

        alive = {a.name: a for a in list_actors(address=url, filters=[("state", "=", "ALIVE")])}
        assert {"attention-0", "expert-0"} <= set(alive), sorted(alive)
        assert alive["attention-0"].class_name == "AttentionActor"
        assert alive["expert-0"].class_name == "ExpertShardActor"
        assert [pg for pg in list_placement_groups(address=url) if pg.state == "CREATED"]
        assert client.get_job_status(job) == JobStatus.RUNNING  # the entrypoint keeps serving
    finally:
        client.stop_job(job)

    _wait("the job STOPPED", lambda: client.get_job_status(job).is_terminal(), 90)
    assert client.get_job_status(job) == JobStatus.STOPPED
    logs = client.get_job_logs(job)
    assert f"application '{APP}' deleted" in logs, logs[-4000:]  # SIGTERM ran the CLI's cleanup, no SIGKILL
    _wait("the Serve app deleted", lambda: _app_status(url) is None, 60)

    def data_plane_gone() -> bool:
        names = {a.name for a in list_actors(address=url, filters=[("state", "=", "ALIVE")])}
        return not names & {"attention-0", "expert-0"}

    _wait("the data-plane actors gone", data_plane_gone, 60)
    _wait("no placement groups left", lambda: not [
        pg for pg in list_placement_groups(address=url) if pg.state not in ("REMOVED",)], 60)
