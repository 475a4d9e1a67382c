"""Session fixtures: real `kvserve serve` processes on 127.0.0.1, talked to over HTTP.

`server` is the shared default server (started once per session); `launch_server` starts more
with their own flags (a small queue, an API key, ...) and stops them all at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from kvserve.server.ports import free_local_port

# Without a GPU the Triton kernels run under the interpreter; Triton reads this when it is first
# imported, so it must be set before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

STARTUP_TIMEOUT_S = 300  # the first start of a session may convert the default model (~25 s)


class ServerProcess:
    """`python -m kvserve serve` on a free local port; its output goes to a log file."""

    def __init__(self, *args: str) -> None:
        self.port = free_local_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="kvserve-test-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvserve", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvserve serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"kvserve serve did not become healthy in {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        """SIGTERM: the graceful shutdown."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def launch_server() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def launch(*args: str) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]

    yield launch
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def server(launch_server: Callable[..., ServerProcess]) -> str:
    """Base URL of the shared server: the default model, a 512 MiB KV cache."""
    return launch_server("--kv-cache-memory", str(512 << 20)).url
