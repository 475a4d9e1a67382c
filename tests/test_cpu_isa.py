"""The CPU ISA switch: `KVSERVE_CPU_ISA=avx2` runs this machine as an AVX2-only CPU (kernels built
for x86-64-v3, torch's libraries capped), and bfloat16 on a CPU that lacks it says what it costs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve import CPU_ISA_CAPS
from kvserve.kernels import cpu_library
from tests.helpers import runner_for, save_tiny_model

PROBE = """
import json, os, kvserve, torch
from kvserve.kernels import amx_linear, cpu_library
lib = cpu_library.library()
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "amx": amx_linear.available(),
                  "bf16": cpu_library.native_bfloat16(), "library": lib._name if lib else None,
                  "env": {k: os.environ.get(k) for k in kvserve.CPU_ISA_CAPS["avx2"]}}))
"""


def probe(isa: str) -> dict:
    env = {**os.environ, "KVSERVE_CPU_ISA": isa}
    for name in CPU_ISA_CAPS["avx2"]:
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cpu_library.available(), reason="no C++ compiler: the torch references run")
def test_avx2_switch_builds_for_x86_64_v3_and_caps_torch():
    avx2, native = probe("avx2"), probe("native")
    assert avx2["aten"] == "AVX2" and not avx2["amx"] and not avx2["bf16"]
    assert avx2["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                           "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    # a library of its own, with no 512-bit instruction in it (objdump ships with the compiler's binutils)
    assert avx2["library"] != native["library"]
    objdump = shutil.which("objdump")
    if objdump is not None:
        listing = subprocess.run([objdump, "-d", avx2["library"]], capture_output=True, text=True, check=True).stdout
        assert "zmm" not in listing and "tmm" not in listing
        assert "ymm" in listing and "vfmadd" in listing
    # natively, what the CPU has: AVX-512 builds and ATen's AVX512 kernels on a CPU with avx512f
    if "avx512f" in cpu_library.cpu_flags():
        assert native["aten"].startswith("AVX512")


def test_an_unknown_isa_is_refused():
    env = {**os.environ, "KVSERVE_CPU_ISA": "avx9"}
    out = subprocess.run([sys.executable, "-c", "import kvserve.kernels.cpu_library"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "KVSERVE_CPU_ISA must be one of" in out.stderr


def test_bfloat16_without_native_support_says_so_at_start(tmp_path: Path, monkeypatch, caplog):
    folder = save_tiny_model(tmp_path / "tiny", "llama")
    monkeypatch.setattr(cpu_library, "native_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kvserve.engine"):
        runner_for(folder, dtype="bfloat16", kv_cache_memory=4 << 20)
    warned = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(warned) == 1 and "float32" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvserve.engine"):
        runner_for(folder, dtype="float32", kv_cache_memory=4 << 20)
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]
