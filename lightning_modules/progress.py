"""Progress lines for logs: a terminal gets progress bars, a log file (stderr not a terminal) gets a line now and
then, so a long evaluation or generation written to a file shows it is moving."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class ProgressLog:
    """`update(items, tokens)` logs "<what>: done/total questions, tokens/s, elapsed" at most every `every_s`
    seconds and at the end, when stderr is not a terminal (`force` logs on a terminal too)."""

    def __init__(self, what: str, total: int, every_s: float = 30.0, force: bool = False) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.enabled = force or not sys.stderr.isatty()
        self.done = self.tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, items: int, tokens: int = 0) -> None:
        self.done, self.tokens = self.done + items, self.tokens + tokens
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            elapsed = now - self.start
            line = (f"{self.what}: {self.done}/{self.total} questions, {self.tokens / max(elapsed, 1e-9):.0f} "
                    f"tokens/s, {elapsed:.0f} s")
            log.info(line)
            print(line, file=sys.stderr, flush=True)
