"""Progress lines for logs: a terminal gets progress bars, a log file (stderr not a terminal) gets a line now and
then, so a long evaluation or generation written to a file shows it is moving; and where a run's time goes, by
phase (`phase`, reported at the end of every `labelfree` fit and test by `cli.PhaseReport`)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

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


class Phases:
    """Wall seconds per named phase of this process's run: `with phase("generation"): ...` (or `@phase(...)`).
    Exclusive: a phase entered inside another is recorded under both names ("evaluation/generation",
    "training/checkpoint"; one inside itself under its own name) and pauses the outer one's clock, so the phases
    add up to the time they cover and `report()` adds the rest since `reset()` as "other"."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[tuple[str, str]] = []  # (name, recorded name)
        self.start = self.mark = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        if self.stack:
            recorded = self.stack[-1][1]
            self.seconds[recorded] = self.seconds.get(recorded, 0.0) + now - self.mark
        self.mark = now

    def enter(self, name: str) -> None:
        self._charge()
        outer = self.stack[-1][1] if self.stack else None
        same = self.stack and self.stack[-1][0] == name  # a phase inside itself (an engine's chunks) counts once
        self.stack.append((name, outer if same else f"{outer}/{name}" if outer else name))

    def exit(self, name: str) -> None:
        if not self.stack or self.stack[-1][0] != name:
            raise RuntimeError(f"phase {name!r} ended while {self.stack[-1][1] if self.stack else 'no phase'!r} ran")
        self._charge()
        self.stack.pop()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def report(self) -> dict[str, float]:
        """Seconds per phase in first-entered order, then "other" and "total" (since `reset`)."""
        self._charge()
        total = self.mark - self.start
        return {**self.seconds, "other": total - sum(self.seconds.values()), "total": total}


phase = Phases()  # this process's phases; `labelfree` resets it when a run is built
