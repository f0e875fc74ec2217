"""What the method-table benchmarks share: running every method for every seed, and mean ± std cells."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence


def run_grid(methods: Sequence[str], seeds: Sequence[int], run: Callable[[str, int, bool], dict]):
    """`run(method, seed, first)` for every seed and method (`first`: the very first run, which measures what does
    not depend on the method or seed); prints each row as it comes. Returns ({method: rows}, the first row)."""
    results: dict[str, list[dict]] = {m: [] for m in methods}
    first = None
    for seed in seeds:
        for method in methods:
            row = run(method, seed, first is None)
            first = row if first is None else first
            results[method].append(row)
            print(f"seed {seed} {method}: {json.dumps(row)}", flush=True)
    return results, first


def mean_std(values: Sequence[float | None], digits: int = 3, se: bool = False) -> str:
    """`mean ± std` over the values that are not None (std 0 for one value; "-" for none), with the standard
    error std / sqrt(n) when `se`."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    cell = f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"
    return f"{cell} (se {std / len(values) ** 0.5:.{digits}f})" if se else cell
