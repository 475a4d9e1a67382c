"""A server in a child process, on a free local port, for the tests and benchmarks that talk to one
over HTTP: started, ready once `GET /health` answers 200, its output kept in a log file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from kvserve.server.ports import free_local_port


class ServerProcess:
    """`command(port)` started now; the constructor returns once the server is healthy, or raises
    with the server's log when it exits or is not healthy within `timeout` seconds."""

    def __init__(self, command: Callable[[int], list[str]], timeout: float = 300, env: dict[str, str] | None = None,
                 name: str = "server") -> None:
        self.port = free_local_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env if env is not None else os.environ.copy())
        self._wait_ready(timeout)

    @classmethod
    def kvserve(cls, *args: str, timeout: float = 300) -> ServerProcess:
        """`python -m kvserve serve` with these flags."""
        return cls(lambda port: [sys.executable, "-m", "kvserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 *args], timeout, name="kvserve")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
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

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
