"""`kvserve serve | generate | bench | eval` (also `python -m kvserve ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvserve.engine.config import SCHEDULING_POLICIES, EngineConfig, attention_backends
from kvserve.eval.args import add_concurrency_args, add_eval_args


def add_engine_args(parser: argparse.ArgumentParser, prefix_caching: bool = True) -> None:
    """The engine's flags. `prefix_caching`: the default of --enable-prefix-caching (off for the
    benchmarks and evaluations, where every policy and round must compute the same prompts)."""
    parser.add_argument("--model", default=None,
                        help="built-in name (default SmolLM2-135M-Instruct), an HF folder or a .gguf file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="bytes of KV cache (default: a tenth of free memory)")
    parser.add_argument("--block-size", type=int, default=16, help="token slots per page")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens per step: the prefill work a step may add to its decodes")
    parser.add_argument("--chunked-prefill-size", type=int, default=None,
                        help="prompts are prefilled in chunks ending at multiples of this many tokens (default: "
                             "half of --max-num-batched-tokens, less where --max-num-seqs decodes would not fit "
                             "beside it); smaller chunks keep the steps decodes share with a prefill short")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto", choices=attention_backends(),
                        help="auto: triton on a GPU; on a CPU the compiled kernels (cpu), or the torch "
                             "references where no C++ compiler is found")
    parser.add_argument("--kv-policy", default=None, help="default policy: a name or a JSON object")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
                        help="fcfs: arrival order; priority: by each request's `priority` (lower first), then "
                             "arrival, and the least urgent running request is preempted first")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=prefix_caching,
                        help="keep prompt blocks' KV for later requests that start with the same tokens "
                             "(evicted least recently used when the pool needs the pages)")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's flags; deploy/ray_serve parses them too, so its replicas take `kvserve serve`'s options."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"))
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--log-prompts", action="store_true", help="include prompt text in request logs")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="larger request bodies get 413 (1 MiB: a full 8k-token context is far less)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        chunked_prefill_size=args.chunked_prefill_size, max_model_len=args.max_model_len,
                        attention_backend=args.attention_backend, kv_policy=args.kv_policy,
                        scheduling_policy=args.scheduling_policy, enable_prefix_caching=args.enable_prefix_caching)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("KVSERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="kvserve")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_args(serve)
    add_serve_args(serve)

    generate = commands.add_parser("generate", help="generate from one prompt and print the text")
    add_engine_args(generate)
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    engine_bench = bench_kinds.add_parser("engine", help="offline throughput and latency vs transformers")
    add_engine_args(engine_bench, prefix_caching=False)
    engine_bench.add_argument("--num-requests", type=int, default=32)
    engine_bench.add_argument("--input-len", type=int, default=512)
    engine_bench.add_argument("--output-len", type=int, default=128)
    engine_bench.add_argument("--hf-sequential", type=int, default=4,
                              help="requests timed through transformers one at a time (its rate is per token)")
    engine_bench.add_argument("--skip-hf", action="store_true", help="do not run the transformers baselines")
    engine_bench.add_argument("--rounds", type=int, default=3,
                              help="rounds of kvserve then transformers' padded batch; each figure is the median "
                                   "over rounds, each ratio the median of the rounds' ratios")
    prefill_bench = bench_kinds.add_parser("prefill", help="one prompt's prefill time per policy, against full's")
    add_engine_args(prefill_bench, prefix_caching=False)
    prefill_bench.add_argument("--policies", default="h2o,snapkv,tova",
                               help="policy names, comma-separated, each with its defaults (full runs too)")
    prefill_bench.add_argument("--num-requests", type=int, default=3, help="prompts, each prefilled alone")
    prefill_bench.add_argument("--input-len", type=int, default=2000)
    policy_bench = bench_kinds.add_parser("policies", help="concurrent long sequences per policy at a fixed KV size")
    add_engine_args(policy_bench, prefix_caching=False)
    add_concurrency_args(policy_bench)

    evaluate = commands.add_parser("eval", help="passkey, logit fidelity, KV bytes and decode speed per policy")
    add_engine_args(evaluate, prefix_caching=False)
    add_eval_args(evaluate)

    args = parser.parse_args(argv)
    try:
        config = engine_config(args)
    except ValueError as error:
        parser.error(str(error))  # exit 2 with the usage line, as for any other bad flag
    if args.command == "serve":
        from kvserve.server.api_server import run_server

        return run_server(args, config)
    if args.command == "generate":
        return _generate(args, config)
    if args.command == "eval":
        from kvserve.eval.harness import run_eval

        return run_eval(args, config)
    if args.kind == "policies":
        from kvserve.eval.concurrency import run_policy_bench

        return run_policy_bench(args, config)
    if args.kind == "prefill":
        from kvserve.engine.bench import run_prefill_bench

        return run_prefill_bench(args, config)
    from kvserve.engine.bench import run_engine_bench

    return run_engine_bench(args, config)


def _generate(args: argparse.Namespace, config: EngineConfig) -> int:
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(config)
    tokenizer = engine.tokenizer
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    out = engine.generate([list(ids)], params)[0]
    sys.stdout.write(tokenizer.decode(out, skip_special_tokens=True) + "\n")
    return 0
