"""AffinityRouter: Ray Serve's request-router API, routing by the ingress's affinity key.

The key travels as the handle's session_id. A key goes to the replica of highest rendezvous hash
(highest random weight): every router process computes the same owner, and when replicas come or
go only the keys of those replicas move. When the owner is at its max_ongoing_requests the request
falls back to the least loaded of the others, and a request with no key goes straight to the least
loaded replica (Ray Serve's queue-length probes choose within a rank)."""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def rank_replicas(key: str | None, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Ranks to try in order: the key's owner alone, then all the others; no key: everyone at once.
    Within a rank the shortest queue wins and ties go to the first, so the rank is shuffled: idle
    replicas then share key-less traffic instead of the first one taking all of it."""
    if not key:
        return [random.sample(replicas, len(replicas))]
    ranked = sorted(replicas, key=lambda r: rendezvous_weight(key, r.replica_id.unique_id), reverse=True)
    return [ranked[:1], random.sample(ranked[1:], len(ranked) - 1)]


class AffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # when every rank is full, back off before trying again rather than spin
        pending_request.routing_context.should_backoff = True
        return rank_replicas(pending_request.metadata.session_id, candidate_replicas)
