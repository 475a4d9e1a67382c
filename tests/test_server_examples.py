"""The README's API examples run against the live server: every ```bash and ```python block, with
the example's localhost:8000 pointed at the test server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_URL = "http://localhost:8000"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", EXAMPLES.read_text(), flags=re.S | re.M)


def run(command: list[str], code: str, server: str) -> str:
    assert EXAMPLE_URL in code, "the example talks to the documented address"
    done = subprocess.run([*command, code.replace(EXAMPLE_URL, server)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("code", blocks("bash"))
def test_bash_example(server: str, code: str) -> None:
    body = json.loads(run(["bash", "-ec"], code, server))
    assert body["choices"][0]["message"]["content"]
    kv_cache = body["usage"]["kv_cache"]
    assert kv_cache["policy"] == "h2o" and kv_cache["peak_bytes"] <= kv_cache["full_bytes"]


@pytest.mark.parametrize("code", blocks("python"))
def test_python_example(server: str, code: str) -> None:
    out = run([sys.executable, "-c"], code, server)
    text, _, usage = out.rstrip("\n").rpartition("\n")
    assert text.strip()
    assert re.fullmatch(r"\d+ tokens, KV cache: \{'policy': 'h2o', .*\}", usage)


def test_examples_exist() -> None:
    assert len(blocks("bash")) == 1 and len(blocks("python")) == 1
