"""kvserve: an OpenAI-compatible server that compresses the KV cache per head.

`KVSERVE_CPU_ISA=avx2` makes an AVX-512 or AMX host run as an AVX2-only CPU: the compiled kernels
are built for x86-64-v3 (kernels/cpu_library.py), and the libraries under torch are capped here, before
torch is first imported (each reads its variable once, at its first use; a value already set wins).
"""

import os

CPU_ISA_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

for _name, _value in CPU_ISA_CAPS.get(os.environ.get("KVSERVE_CPU_ISA", "native"), {}).items():
    os.environ.setdefault(_name, _value)
