"""Start `lora-pipeline serve` as a user does and talk to it over HTTP (shared by the end-to-end tests)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def served(reference: str, cwd: Path, *config_args: str, timeout: float = 300) -> Iterator[tuple[str, dict]]:
    """``lora-pipeline serve REFERENCE`` in a subprocess; yields (base URL, /health reply) once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "lora_pipeline.cli", "serve", reference, "--port", str(port), *config_args]
    server = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = http("GET", f"{url}/health")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:]
                time.sleep(1)
        yield url, health
    finally:
        server.terminate()
        server.wait(timeout=30)
