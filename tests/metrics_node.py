"""A Ray node of a test's own with a Prometheus endpoint (the session's cluster has no metrics port).

`metrics_driver(driver, *args)` runs `driver` (Python source) in a subprocess as
`python -c driver PORT *args`: it starts `ray.init(..., _metrics_export_port=PORT)`, does its work, prints one
line `RESULT <json>`, then waits for a line on stdin (the test has scraped) before shutting down. Ray exports
every 500 ms there. `scrape(port)` reads the endpoint's llama4serve samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def metrics_driver(driver: str, *args: str) -> Iterator[tuple[int, dict]]:
    """(the metrics port, the driver's RESULT); the driver ends when the block does."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_metrics_report_interval_ms"] = "500"
    proc = subprocess.Popen([sys.executable, "-c", driver, str(port), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # the driver ends within the job's timeout, or the finally kills it
            lines.append(line)
            if line.startswith("RESULT "):
                break
        else:
            raise AssertionError("the metrics driver exited early:\n" + "".join(lines[-40:]))
        yield port, json.loads(line.removeprefix("RESULT "))
    finally:
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def scrape(port: int) -> dict[str, list]:
    """Samples of the llama4serve metrics by sample name (Ray's `ray_` prefix removed)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_llama4serve_"):
                samples[s.name.removeprefix("ray_")].append(s)
    return samples


def total(samples: dict, name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def scrape_until(port: int, done: Callable[[dict], bool], timeout_s: float = 30) -> dict[str, list]:
    """Scrapes until `done(samples)` (Ray exports on its report interval) or the timeout; the last samples."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


# The end of a driver whose class `Host` (a Ray actor holding `self.engine`, an AsyncEngine, as the Serve Engine
# replica does) has a `run` method returning the RESULT: appended to the driver's dedented source.
HOSTED_ENGINE_END = '''
    def shutdown(self):
        self.engine.shutdown()


host = Host.remote()
print("RESULT " + json.dumps(ray.get(host.run.remote())), flush=True)
sys.stdin.readline()  # the test has scraped
ray.get(host.shutdown.remote())
ray.shutdown()
'''
