"""Where kvserve keeps what it builds once and reuses: converted models and compiled CPU kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`KVSERVE_CACHE_DIR`, by default ~/.cache/kvserve."""
    return Path(os.environ.get("KVSERVE_CACHE_DIR", Path.home() / ".cache" / "kvserve"))
