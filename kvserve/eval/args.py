"""Command-line arguments of `kvserve eval` and `kvserve bench policies` (kept apart from the code
they drive, so building the parser imports neither the engine nor matplotlib)."""

from __future__ import annotations

import argparse

DEFAULT_POLICIES = ("full,h2o:0.5,h2o:0.25,snapkv:0.5,snapkv:0.25,streaming_llm:0.5,streaming_llm:0.25,"
                    "knorm:0.5,knorm:0.25,tova:0.5,tova:0.25,corm,corm:window=32:recent=32")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="evaluate a running server instead (passkey only)")
    parser.add_argument("--api-key", default=None, help="with --url: the server's API key")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="a JSON list of policy objects, or e.g. full,h2o:0.5,corm:window=32:recent=32 "
                             "(a bare number is the ratio)")
    parser.add_argument("--contexts", default="2000,4000", help="passkey prompt lengths in tokens")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths (0 start, 1 end)")
    parser.add_argument("--trials", type=int, default=2, help="passkeys (seeds) per context and depth")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens generated per passkey prompt")
    parser.add_argument("--fidelity-context", type=int, default=1500, help="prompt tokens of natural text")
    parser.add_argument("--fidelity-continuation", type=int, default=128, help="tokens teacher-forced after it")
    parser.add_argument("--fidelity-samples", type=int, default=2, help="disjoint text windows (0: skip)")
    parser.add_argument("--out", default="eval_results", help="folder for results.json and the heatmaps")
    parser.add_argument("--peer", choices=["kvpress"], default=None,
                        help="also run NVIDIA kvpress's presses on the same prompts (in its own venv: "
                             "`make kvpress-venv`) and print both accuracies side by side")
    parser.add_argument("--peer-python", default=".venv-kvpress/bin/python", help="with --peer: kvpress's python")
    parser.add_argument("--peer-presses", default="",
                        help="with --peer: kvpress presses without a kvserve policy, run at every ratio the "
                             "policies use, e.g. expected_attention,adakv,kvzip")
    parser.add_argument("--peer-split-question", action="store_true",
                        help="with --peer: kvpress compresses only the context and reads the question after, "
                             "as its pipeline does (kvserve still compresses the whole prompt)")


def add_concurrency_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default="h2o:0.25,snapkv:0.25,streaming_llm:0.25",
                        help="compared with full (always run first); shorthand or a JSON list")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=4000, help="prompt tokens (natural-ish filler text)")
    parser.add_argument("--output-len", type=int, default=32)
