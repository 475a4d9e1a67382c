"""The default model end to end through the Triton backend (under the interpreter on a CPU)."""

from __future__ import annotations

import os

import pytest

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
def test_triton_backend_greedy_tokens_equal_torch_backend():
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(kv_cache_memory=32 << 20, attention_backend=backend, max_num_batched_tokens=8))
        prompts = [engine.tokenizer(text)["input_ids"] for text in ("The capital of France is", "1, 2, 3, 4, 5,")]
        # chunks of 8 tokens: the second prompt's last chunk attends to cached pages and decodes beside the first
        tokens[backend] = engine.generate(prompts, params)
    assert tokens["triton"] == tokens["torch"]
