"""Shared test helpers: tiny random-weight HF models and driving the model runner by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.engine.config import EngineConfig
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.sampling_params import SamplingParams
from kvserve.engine.scheduler import ScheduledBatch
from kvserve.engine.sequence import Sequence
from kvserve.kernels import amx_linear, cpu_library
from kvserve.policies.registry import create_policy, parse_policy

needs_amx = pytest.mark.skipif(not amx_linear.available(), reason="this CPU (or its OS) offers no AMX")
# bfloat16 at the speed a test's time budget assumes; elsewhere the same test's float32 case runs
needs_native_bf16 = pytest.mark.skipif(not cpu_library.native_bfloat16(),
                                       reason="no AVX512-BF16 or AMX: bfloat16 matmuls run in software")


def save_tiny_model(folder: Path, family: str) -> Path:
    """A random-weight Llama (GQA, llama3 RoPE scaling) or Qwen2 (GQA, q/k/v bias) in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5)
    if family == "llama":
        config = LlamaConfig(**common, head_dim=16, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def make_sequence(prompt: list[int], params: SamplingParams | None = None, policy: object = None) -> Sequence:
    policy_params = parse_policy(policy)
    params = params or SamplingParams(max_tokens=1, temperature=0)
    return Sequence(request_id=f"test-{id(prompt)}", prompt_token_ids=list(prompt), params=params,
                    policy_params=policy_params, policy=create_policy(policy_params, len(prompt)),
                    detokenizer=IncrementalDetokenizer(None, []), seed=0)


def runner_for(folder: Path | None, **config: object) -> ModelRunner:
    return ModelRunner(EngineConfig(model=None if folder is None else str(folder), **config))


def feed(runner: ModelRunner, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
    """Feed each sequence its next `counts` tokens (acquiring rows as needed); return the logits of
    the sequences whose tokens are now all in the cache, in order."""
    for seq in seqs:
        if seq.row is None:
            seq.row = runner.table.acquire_row()
    return runner.execute(ScheduledBatch(seqs, counts)).logits


def assert_idle_and_clear(engine) -> None:  # noqa: ANN001
    """After a test: nothing runs, every page is free or held by the prefix cache alone (the pool's
    invariants hold), and once the cache lets go every page is free; the next test starts cold."""
    assert not engine.has_unfinished()
    engine.runner.check_invariants(live_rows=[])
    pool = engine.runner.pool
    assert pool.pages_available == pool.capacity
    if engine.runner.prefix_cache is not None:
        engine.runner.prefix_cache.clear()
    assert pool.pages_free == pool.capacity
