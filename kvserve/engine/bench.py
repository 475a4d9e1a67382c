"""`kvserve bench engine`: offline throughput and batch-1 latency beside HF transformers on the same
model, machine and run, and how close both come to this machine's ceilings: its float32 FMA peak and
its copy bandwidth, measured by the project's own small kernels (kernels/roofline.py), so that a slow
library cannot pass for the hardware's limit.

`kvserve bench prefill`: what observing attention costs a prompt's prefill, per policy: each prompt
prefilled alone (one output token) under full and under each policy in turn, and each policy's time
over full's, the median of the per-prompt ratios."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvserve.engine.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.sampling_params import SamplingParams
from kvserve.kernels import cpu_library, roofline
from kvserve.model.config import ModelConfig
from kvserve.model.llama import Projection

BATCH1_REPEATS = 3


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # skip the lowest ids, which are special tokens in most vocabularies
    return torch.randint(100, vocab, (count, length), generator=gen).tolist()


def flops_per_token(cfg: ModelConfig, context: int, lm_head: bool = True) -> float:
    """Matmul FLOPs of one token: every projection, attention over `context`, and the LM head (which
    a prompt token that samples nothing skips)."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size
    attention = 2 * cfg.num_heads * cfg.head_dim * context
    return 2 * (cfg.num_layers * (per_layer + attention) + (d * cfg.vocab_size if lm_head else 0))


def matmul_rate(cfg: ModelConfig, rows: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of the model's own projection shapes and kernels at `rows` rows (the ceiling for that
    batch size)."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # (out, in, swiglu) of q/k/v, o, gate/up and down
    shapes = [(q + 2 * kv, d, False), (d, q, False), (2 * cfg.intermediate_size, d, True),
              (d, cfg.intermediate_size, False)]
    projections = [Projection(torch.randn(o, i, dtype=dtype), swiglu=swiglu) for o, i, swiglu in shapes]
    inputs = [torch.randn(rows, i, dtype=dtype) for _, i, _ in shapes]
    flops = sum(2 * rows * o * i for o, i, _ in shapes)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, projection in zip(inputs, projections):
            projection(x)
        count += 1
    return count * flops / (time.perf_counter() - start)


def ours_throughput(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o) for o in outputs) / elapsed


def ours_decode_latency(engine: LLMEngine, prompt: list[int], steps: int) -> float:
    """Seconds per decode step at batch 1, prefill excluded."""
    engine.add_request("latency", prompt, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    engine.step()  # prefill (and the first token)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - start) / steps


def prefill_seconds(engine: LLMEngine, prompt: list[int], policy: str) -> float:
    """Seconds to prefill `prompt` alone under `policy` and sample its one token."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate([prompt], params, policy)
    return time.perf_counter() - start


def run_prefill_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    engine = LLMEngine(config)
    policies = ["full", *(name.strip() for name in args.policies.split(",") if name.strip() != "full")]
    prompts = random_prompts(engine.model_config.vocab_size, args.num_requests, args.input_len, seed=1)
    prefill_seconds(engine, prompts[0][:32], "full")  # first-call set-up is not prefill
    # per prompt, every policy in turn: a busy minute on a shared host lands on all of them
    times = {policy: [] for policy in policies}
    for prompt in prompts:
        for policy in policies:
            times[policy].append(prefill_seconds(engine, prompt, policy))
    print(f"model {engine.runner.folder.name}, {config.torch_dtype}, {config.machine()}; "
          f"{args.num_requests} prompts of {args.input_len} tokens, each prefilled alone in chunks of "
          f"{engine.scheduler.prefill_chunk} tokens")
    print(f"{'policy':<12}{'prefill s':>11}{'x full':>9}")
    for policy in policies:
        ratio = statistics.median(t / f for t, f in zip(times[policy], times["full"]))
        print(f"{policy:<12}{statistics.median(times[policy]):>11.3f}{ratio:>8.2f}x")
    print("prefill s: the median over prompts; x full: the median of each prompt's time over full's")
    return 0


def hf_generate_time(model, prompts: list[list[int]], new_tokens: int) -> float:  # noqa: ANN001
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run_engine_bench(args: argparse.Namespace, config: EngineConfig) -> int:
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    config.max_num_seqs = max(config.max_num_seqs, args.num_requests)
    engine = LLMEngine(config)
    cfg, dtype = engine.model_config, config.torch_dtype
    prompts = random_prompts(cfg.vocab_size, args.num_requests, args.input_len)
    print(f"model {engine.runner.folder.name}, {dtype}, {torch.get_num_threads()} threads; "
          f"{args.num_requests} requests x {args.input_len} prompt tokens x {args.output_len} generated, greedy")

    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(engine.runner.folder, dtype=dtype).eval()
    # one short request each first: first-call set-up (oneDNN, page first touch) is not throughput
    ours_throughput(engine, [prompts[0][:32]], 2)
    if hf is not None:
        hf_generate_time(hf, [prompts[0][:32]], 2)
    # ours and transformers' padded batch alternate, so that a busy minute on a shared host lands on
    # both sides of a round's ratio rather than on one side of the whole comparison
    ours_runs, hf_batch_runs = [], []
    for _ in range(args.rounds):
        ours_runs.append(ours_throughput(engine, prompts, args.output_len))
        if hf is not None:
            hf_batch_runs.append(args.num_requests * args.output_len / hf_generate_time(hf, prompts, args.output_len))
    ours_tps = statistics.median(ours_runs)
    steps = min(args.output_len, 64)

    # the workload's matmul FLOPs: prompts (at half their length on average) and generated tokens
    prefill_flops = args.num_requests * args.input_len * flops_per_token(cfg, args.input_len // 2, lm_head=False)
    decode_flops = args.num_requests * args.output_len * flops_per_token(cfg, args.input_len + args.output_len // 2)
    rate_prefill = matmul_rate(cfg, config.max_num_batched_tokens, dtype)
    rate_batch = matmul_rate(cfg, args.num_requests, dtype)
    rate_one = matmul_rate(cfg, 1, dtype)
    peak, bandwidth, read = roofline.fma_peak(), roofline.copy_bandwidth(), roofline.read_bandwidth()
    weight_bytes = engine.runner.model.weight_bytes_per_step
    # each generated token's step reads its sequence's whole cache once
    kv_bytes = (args.num_requests * args.output_len * (args.input_len + args.output_len // 2) * cfg.num_layers
                * cfg.num_kv_heads * 2 * cfg.head_dim * dtype.itemsize)
    # a decode step is bound by its FLOPs or by reading the weights once, whichever takes longer
    decode_floor_s = max(decode_flops / peak, args.output_len * weight_bytes / read)
    floor_s = prefill_flops / peak + decode_floor_s + kv_bytes / read
    best_tps = args.num_requests * args.output_len / floor_s

    rows = [("kvserve output tokens/s", ours_tps, None)]
    if hf is not None:
        sequential = prompts[: args.hf_sequential]
        seq_time = sum(hf_generate_time(hf, [p], args.output_len) for p in sequential)
        hf_one_tps = len(sequential) * args.output_len / seq_time
        hf_batch_tps = statistics.median(hf_batch_runs)
        batch_ratio = statistics.median(ours / theirs for ours, theirs in zip(ours_runs, hf_batch_runs))
        rows += [(f"transformers one at a time (first {len(sequential)} requests)", hf_one_tps, ours_tps / hf_one_tps),
                 ("transformers one padded batch", hf_batch_tps, batch_ratio)]

    # batch-1 latencies are short enough to take the best of BATCH1_REPEATS, alternating ours and
    # theirs, so that a noisy neighbour on a shared host does not decide the ratio
    ours_step = hf_step = float("inf")
    for _ in range(BATCH1_REPEATS):
        ours_step = min(ours_step, ours_decode_latency(engine, prompts[0], steps))
        if hf is not None:
            hf_step = min(hf_step, (hf_generate_time(hf, prompts[:1], steps + 1)
                                    - hf_generate_time(hf, prompts[:1], 1)) / steps)

    print(f"\n{'throughput':<55}{'tok/s':>10}{'kvserve x':>12}")
    for name, value, ratio in rows:
        print(f"{name:<55}{value:>10.1f}{'' if ratio is None else f'{ratio:.2f}x':>12}")
    if args.rounds > 1:
        what, by_round = ("kvserve", [f"{ours:.0f}" for ours in ours_runs]) if hf is None else (
            "kvserve / padded batch", [f"{ours:.0f} / {theirs:.0f}" for ours, theirs in zip(ours_runs, hf_batch_runs)])
        print(f"  medians of {args.rounds} rounds; {what} tok/s by round: {', '.join(by_round)}")
    print(f"\n{f'batch-1 decode (best of {BATCH1_REPEATS})':<55}{'ms/token':>10}{'time ratio':>12}")
    print(f"{'kvserve':<55}{ours_step * 1e3:>10.1f}")
    if hf is not None:
        print(f"{'transformers':<55}{hf_step * 1e3:>10.1f}{ours_step / hf_step:>11.2f}x")

    print(f"\nceilings measured in this run ({cpu_library.machine()})")
    print(f"  float32 FMA peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {read / 1e9:.1f} GB/s, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written)")
    print(f"  the model's projections: {rate_prefill / 1e9:.0f} GFLOP/s at {config.max_num_batched_tokens} rows "
          f"(a prefill step, {rate_prefill / peak:.0%} of peak), {rate_batch / 1e9:.0f} at {args.num_requests} "
          f"({rate_batch / peak:.0%}), {rate_one / 1e9:.1f} at 1")
    print(f"  throughput: {prefill_flops / 1e12:.2f} TFLOP of prompts and {decode_flops / 1e12:.2f} of generation at "
          f"peak (or {args.output_len} reads of the weights, if longer), and {kv_bytes / 1e9:.0f} GB of KV cache read "
          f"by decode attention at read bandwidth, take {floor_s:.1f} s: a ceiling of {best_tps:.0f} output tok/s, "
          f"of which kvserve reaches {ours_tps / best_tps:.0%}")
    print(f"  batch-1 decode: {weight_bytes / 2**20:.0f} MiB of weights per step / {ours_step * 1e3:.1f} ms = "
          f"{weight_bytes / ours_step / 1e9:.1f} GB/s, {weight_bytes / ours_step / read:.0%} of read bandwidth "
          f"({weight_bytes / ours_step / bandwidth:.0%} of copy bandwidth)")
    return 0
