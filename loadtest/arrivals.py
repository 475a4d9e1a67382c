"""When open-loop requests are sent: `vllm bench serve`'s arrival process.

A gamma process of mean rate `rate`: shape `burstiness`, scale 1 / (rate * burstiness). Burstiness 1
is a Poisson process (exponential gaps); below 1 the arrivals bunch up, above 1 they even out. No
rate (vLLM's `inf`) sends everything at once."""

from __future__ import annotations

import numpy as np


def arrival_gaps(count: int, rate: float | None, burstiness: float, seed: int) -> list[float]:
    """The wait before each of `count` requests, in seconds; the first is sent at once."""
    if count <= 0:
        return []
    if rate is None:
        return [0.0] * count
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the request rate and the burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count - 1)
    return [0.0, *map(float, gaps)]
