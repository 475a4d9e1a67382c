"""One structured (JSON) log line per generation request, written when the request ends however
it ends. Prompt text is left out unless the server runs with --log-prompts."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvserve.server.generation import Generation

log = logging.getLogger("kvserve.request")

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"


@dataclass
class RequestLog:
    request_id: str
    endpoint: str
    stream: bool
    prompt: Any = None  # only set with --log-prompts
    started: float = field(default_factory=time.monotonic)
    generation: Generation | None = None
    _written: bool = False

    def finish(self, status: int) -> None:
        """Write the line (once; later calls are ignored)."""
        if self._written:
            return
        self._written = True
        now = time.monotonic()
        record: dict[str, Any] = {"request_id": self.request_id, "endpoint": self.endpoint, "status": status,
                                  "stream": self.stream, "duration_s": round(now - self.started, 4)}
        gen = self.generation
        if gen is not None:
            first = gen.first_output_time
            record.update(policy=gen.policy.name, n=len(gen.samples), prompt_tokens=gen.prompt_tokens,
                          completion_tokens=gen.completion_tokens,
                          ttft_s=None if first is None else round(first - self.started, 4),
                          finish_reasons=[s.finish_reason for s in gen.samples])
        if self.prompt is not None:
            record["prompt"] = self.prompt
        log.info(json.dumps(record))
