"""`python -m loadtest run|sweep`: the command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import httpx

from loadtest.datasets import DATASETS
from loadtest.metrics import parse_slo
from loadtest.policies import parse_policy
from loadtest.run import RunConfig, run
from loadtest.summary import format_summary
from loadtest.sweep import sweep


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    parser.add_argument("--model", default=None, help="default: the first model of GET /v1/models")
    parser.add_argument("--dataset", default="random", help=f"one of {', '.join(DATASETS)} (default random)")
    parser.add_argument("--num-requests", type=int, default=100, help="requests per run (default 100)")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens, approximately (default 256)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens to generate, EOS ignored (default 64)")
    parser.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: the shared tokens (default 256)")
    parser.add_argument("--num-docs", type=int, default=4,
                        help="documents: the documents, each asked num-requests / num-docs questions; multi-turn: "
                             "the conversations (default 4)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; <1 burstier (gamma arrivals)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo", type=parse_slo, default=None,
                        help="goodput SLOs in ms, e.g. ttft=500,tpot=50 (also e2el)")
    parser.add_argument("--max-duration", type=float, default=600.0,
                        help="seconds per run; then nothing more is sent and in-flight requests are cancelled")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                        help="chat: /v1/chat/completions, a document or conversation as the system message")
    parser.add_argument("--reset-prefix-cache", action="store_true",
                        help="POST /reset_prefix_cache before each run (kvserve, vLLM): runs do not reuse each "
                             "other's prompts")


def config_from(args: argparse.Namespace, **load: object) -> RunConfig:
    return RunConfig(url=args.url, api_key=args.api_key, model=args.model, dataset=args.dataset,
                     num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                     prefix_len=args.prefix_len, num_docs=args.num_docs, burstiness=args.burstiness, seed=args.seed,
                     slo=args.slo,
                     max_duration=args.max_duration, request_timeout=args.request_timeout,
                     scrape_interval=args.scrape_interval, reset_prefix_cache=args.reset_prefix_cache,
                     endpoint=args.endpoint, **load)  # type: ignore[arg-type]


def rate(text: str) -> float | None:
    """Requests/s; `inf` (vLLM's spelling for all at once) is None."""
    value = float(text)
    return None if math.isinf(value) else value


def rates(text: str) -> list[float | None]:
    return [rate(x) for x in text.split(",") if x.strip()]


def prefix_sharing(text: str) -> list[bool]:
    """`shared,isolated` -> [False, True]: whether each run isolates its requests' prefixes."""
    ways = {"shared": False, "isolated": True}
    try:
        return [ways[x.strip()] for x in text.split(",") if x.strip()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected shared, isolated or both, got {text!r}") from None


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="one load run against a server")
    add_common_args(run_parser)
    run_parser.add_argument("--policy", type=parse_policy, default=None,
                            help='kv_policy of every request: a name or JSON, e.g. \'{"name":"h2o","ratio":0.25}\'')
    load = run_parser.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=rate, default=None, help="requests/s (default inf: all at once)")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests kept in flight")
    run_parser.add_argument("--out", type=Path, default=None, help="write result.json into this folder")

    sweep_parser = commands.add_parser("sweep", help="runs over policies x loads, with a JSON, CSV and HTML report")
    add_common_args(sweep_parser)
    sweep_parser.add_argument("--policy", type=parse_policy, action="append", required=True, dest="policies",
                              help="repeat for each policy: a name or a JSON object")
    loads = sweep_parser.add_mutually_exclusive_group(required=True)
    loads.add_argument("--request-rates", type=rates, help="comma-separated requests/s, e.g. 0.5,1,2,inf")
    loads.add_argument("--concurrencies", type=ints, help="comma-separated closed-loop concurrencies")
    sweep_parser.add_argument("--out", type=Path, required=True, help="folder for sweep.json, sweep.csv, report.html")
    sweep_parser.add_argument("--prefix-sharing", type=prefix_sharing, default=[False],
                              help="shared (default), isolated (every request its own cache_salt: no reuse of "
                                   "another's cached prefix), or shared,isolated: each policy both ways")

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            result = run(config_from(args, policy=args.policy, request_rate=args.request_rate,
                                     concurrency=args.concurrency))
            print(format_summary(result))
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "result.json").write_text(json.dumps(result, indent=1))
            return 0
        configs = [config_from(args, policy=policy, request_rate=rate, concurrency=concurrency,
                               isolate_prefixes=isolated)
                   for rate, concurrency in ([(r, None) for r in args.request_rates or []]
                                             + [(None, c) for c in args.concurrencies or []])
                   for policy in args.policies for isolated in args.prefix_sharing]
        paths = sweep(configs, args.out)
        print("\n".join(str(p) for p in paths))
        return 0
    except (ValueError, OSError, httpx.HTTPError) as exc:  # bad arguments, a file, or no server (GET /v1/models)
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
