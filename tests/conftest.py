"""Session fixtures: real `kvserve serve` processes on 127.0.0.1, talked to over HTTP.

`server` is the shared default server (started once per session); `launch_server` starts more
with their own flags (a small queue, an API key, ...) and stops them all at the end."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from kvserve.server.process import ServerProcess

# Without a GPU the Triton kernels run under the interpreter; Triton reads this when it is first
# imported, so it must be set before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

STARTUP_TIMEOUT_S = 300  # the first start of a session may convert the default model (~25 s)


@pytest.fixture(scope="session")
def launch_server() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def launch(*args: str) -> ServerProcess:
        started.append(ServerProcess.kvserve(*args, timeout=STARTUP_TIMEOUT_S))
        return started[-1]

    yield launch
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def server(launch_server: Callable[..., ServerProcess]) -> str:
    """Base URL of the shared server: the default model, a 512 MiB KV cache."""
    return launch_server("--kv-cache-memory", str(512 << 20)).url
