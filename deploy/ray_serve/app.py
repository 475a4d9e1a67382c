"""The Ray Serve application: N KVServeReplica engine replicas behind one KVServeIngress.

`build_app` is an application builder, so `serve run deploy/ray_serve/serve_config.yaml` (or
`serve run deploy.ray_serve.app:build_app replicas=2`) builds the same application as
`python -m deploy.ray_serve`. No `from __future__ import annotations` here: Ray Serve converts a
config's `args` into AppArgs only when build_app's annotation is the class itself, not a string."""

from pydantic import BaseModel, Field
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deploy.ray_serve.engine_replica import KVServeReplica, kvserve_serve_parser
from deploy.ray_serve.ingress import KVServeIngress
from deploy.ray_serve.router import AffinityRouter


class AppArgs(BaseModel):
    replicas: int = Field(2, ge=1, description="engine replicas, each a whole kvserve engine and model")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica (torch uses that many threads)")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on GPU nodes)")
    max_ongoing_requests: int = Field(
        128, ge=1, description="requests in flight per replica before the router falls back to another; "
                               "kvserve queues them and answers 429 past its --max-queue")
    prefix_chars: int = Field(256, ge=0, description="prompt characters hashed for prefix affinity (0: off)")
    kvserve_args: list[str] = Field(default_factory=list, description="`kvserve serve` flags for every replica")


def build_app(args: AppArgs) -> Application:
    kvserve = kvserve_serve_parser().parse_args(args.kvserve_args)  # a bad flag fails here, not in N replicas
    replicas = KVServeReplica.options(
        num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
        # a stopping replica drains its requests for as long as `kvserve serve --shutdown-timeout` would
        graceful_shutdown_timeout_s=kvserve.shutdown_timeout,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter),
    ).bind(args.kvserve_args)
    # the ingress only relays bytes; it must not hold back requests the replicas could queue
    ingress = KVServeIngress.options(ray_actor_options={"num_cpus": 0},
                                     max_ongoing_requests=args.replicas * args.max_ongoing_requests)
    return ingress.bind(replicas, args.prefix_chars)
