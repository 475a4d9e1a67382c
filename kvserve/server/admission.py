"""Admission: how many sequences the server has handed to the engine, and the --max-queue limit.

The count is kept here, on the event loop, and taken synchronously when a request is admitted:
requests that arrive together cannot all pass the check before the engine thread has seen any of
them. A sequence is waiting while it is in flight but not yet running in the engine."""

from __future__ import annotations

from collections import Counter

from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.errors import APIError

RETRY_AFTER_SECONDS = 1


class Admission:
    def __init__(self, engine: AsyncEngine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.in_flight: Counter[str] = Counter()  # sequences per policy name

    def waiting(self) -> int:
        return max(0, sum(self.in_flight.values()) - self.engine.stats().num_running)

    def admit(self, policy: str, num_seqs: int) -> None:
        """Reserve `num_seqs` sequences of `policy`, or raise 429 when --max-queue already wait."""
        if self.waiting() >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight[policy] += num_seqs

    def release(self, policy: str) -> None:
        """One sequence of `policy` has left the engine."""
        self.in_flight[policy] -= 1
        if self.in_flight[policy] <= 0:
            del self.in_flight[policy]
