"""`python -m deploy.ray_serve --replicas N [kvserve serve flags]`: kvserve on Ray Serve.

Starts (or joins, with --address auto) a Ray cluster, runs the application on Ray Serve's HTTP
proxy at --host:--port and serves until SIGINT or SIGTERM, then shuts Serve and the cluster down.
Flags this command does not know are `kvserve serve` flags for every replica."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import ray
from ray import serve

from deploy.ray_serve.app import AppArgs, build_app

log = logging.getLogger("deploy.ray_serve")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, AppArgs]:
    parser = argparse.ArgumentParser(prog="python -m deploy.ray_serve", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[1])
    defaults = AppArgs()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--replica-cpus", type=float, default=defaults.replica_cpus)
    parser.add_argument("--replica-gpus", type=float, default=defaults.replica_gpus)
    parser.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests)
    parser.add_argument("--prefix-chars", type=int, default=defaults.prefix_chars)
    parser.add_argument("--host", default="127.0.0.1", help="Ray Serve's HTTP proxy")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default="local",
                        help="local: start a Ray cluster for this process; auto or ray://...: join one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--object-store-memory", type=int, default=None, help="bytes, local cluster only")
    args, kvserve_args = parser.parse_known_args(argv)
    app_args = AppArgs(replicas=args.replicas, replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                       max_ongoing_requests=args.max_ongoing_requests, prefix_chars=args.prefix_chars,
                       kvserve_args=kvserve_args)
    return args, app_args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, app_args = parse_args(argv)
    application = build_app(app_args)
    local = {"num_cpus": args.num_cpus, "object_store_memory": args.object_store_memory, "include_dashboard": False}
    ray.init(address=args.address, **(local if args.address == "local" else {}))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="kvserve", route_prefix="/")
        log.info("kvserve on Ray Serve: %d replicas at http://%s:%d", app_args.replicas, args.host, args.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
