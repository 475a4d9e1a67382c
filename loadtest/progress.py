"""A live progress line on stderr: requests done, running throughput, errors.

Redrawn in place on a terminal; where stderr is a file or a pipe, one line every few seconds so
logs stay short. No tqdm: one line of text is all it needs."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from loadtest.client import RequestResult

BAR_WIDTH = 24


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr  # looked up now, not at import, so a redirected stderr is used
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.errors = 0
        self.output_tokens = 0

    def add(self, result: RequestResult) -> None:
        self.done += 1
        if result.success:
            self.output_tokens += result.output_tokens
        else:
            self.errors += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        rate = self.output_tokens / elapsed if elapsed > 0 else 0.0
        return (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} requests "
                f"| {rate:.1f} output tok/s | {self.errors} errors | {elapsed:.0f} s")

    def draw(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def run_until(self, stop: asyncio.Event) -> None:
        """Redraw every half second on a terminal (every 5 s otherwise) until `stop`, then a last time."""
        period = 0.5 if self.tty else 5.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period)
            except asyncio.TimeoutError:
                self.draw()
        self.draw(final=True)
