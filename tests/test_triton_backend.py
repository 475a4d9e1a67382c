"""The default model end to end through the Triton backend (under the interpreter on a CPU)."""

from __future__ import annotations

import torch

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.eval.teacher_forcing import teacher_force


def test_triton_backend_greedy_tokens_equal_torch_backend():
    """Both prompts prefill in 4-token chunks (attending to cached pages) and decode side by side; the
    h2o request evicts through the decode scores of the attention-probability kernel."""
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(kv_cache_memory=32 << 20, attention_backend=backend,
                                        max_num_batched_tokens=8, max_num_seqs=2))
        prompts = [engine.tokenizer(text)["input_ids"] for text in ("The capital of France is", "1, 2, 3, 4, 5,")]
        for i, (prompt, policy) in enumerate(zip(prompts, [None, {"name": "h2o", "budget": 6, "recent": 2}])):
            engine.add_request(str(i), prompt, params, policy)
        out: dict[str, list[int]] = {"0": [], "1": []}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.token_ids
        assert engine.policies.tokens_evicted["h2o"] > 0
        tokens[backend] = out
    assert tokens["triton"] == tokens["torch"]


def test_compressed_tiers_attend_alike_through_the_triton_kernels():
    """KIVI and ThinK requests decode over quantized and thin-key records: the Triton kernels and
    the torch references give the same next-token distributions."""
    logprobs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(kv_cache_memory=32 << 20, attention_backend=backend,
                                        max_num_batched_tokens=64, max_num_seqs=2))
        prompt = engine.tokenizer("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")["input_ids"]
        continuation = engine.tokenizer(" 11,")["input_ids"]
        logprobs[backend] = [teacher_force(engine, prompt, continuation, policy) for policy in (
            {"name": "kivi", "bits": 4, "group_size": 16, "residual": 0},
            {"name": "think", "channel_ratio": 0.5, "window": 4})]
        assert engine.runner.tiers.tiers, "no tokens were compressed"
    for torch_lp, triton_lp in zip(logprobs["torch"], logprobs["triton"]):
        # 30 layers of float32 sums in another order differ by ~1e-6 (ThinK: ~5e-5 nat); where such a
        # difference straddles a 4-bit rounding boundary, a KIVI code moves by a whole step, which can
        # move single logprobs by ~1e-2 while the distribution as a whole stays put
        difference = (torch_lp - triton_lp).abs()
        assert difference.mean() < 2e-3
        assert difference.max() < 3e-2
        assert torch.equal(torch_lp.argmax(-1), triton_lp.argmax(-1))
