"""What the method-table benchmarks share: running every method for every seed in parts, through per-run records,
and mean ± std cells."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from datamodules.io import write_atomically

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "results"  # the results pages, generated from the records by each table's --table
READINGS = ROOT / "benchmarks" / "readings"  # what each page's tables say, written by hand


def write_page(name: str, title: str, command: str, produce: Callable[[], None], directory: Path = PAGES) -> str:
    """`directory/<name>.md`: the title, the command that regenerates it, what `produce()` prints (its tables,
    from the committed records alone) and the reading (`benchmarks/readings/<name>.md`). Also printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        produce()
    reading = READINGS / f"{name}.md"
    lines = buffer.getvalue().strip().splitlines()
    body = "\n".join(("\n" if line.startswith("|") and i and lines[i - 1] and not lines[i - 1].startswith("|")
                      else "") + line for i, line in enumerate(lines))  # a table needs a blank line before it
    text = (f"# {title}\n\n```bash\n{command}\n```\n\nGenerated from the records in `benchmarks/results/` by the "
            f"command above; do not edit by hand.\n\n{body}\n")
    if reading.exists():
        text += f"\n## Reading\n\n{reading.read_text().strip()}\n"
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / f"{name}.md", text)
    print(text)
    return text


def load_records(records: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """{(variant, seed): record} of the records made with these settings."""
    loaded = (json.loads(path.read_text()) for path in records.glob("seed*-*.json"))
    return {(r["variant"], r["seed"]): r for r in loaded if r["settings"] == settings}


def run_in_parts(records: Path, variants: Sequence[str], seeds: Sequence[int], run: Callable[[str, int, bool], dict],
                 settings: dict, base_key: str) -> dict[tuple[str, int], dict]:
    """`run(variant, seed, first)` for every seed and variant that has no record yet under `records`
    (`seed<s>-<variant>.json`), each record written as soon as its run ends, with its settings, run time and the
    code's revision; `first` is true while no record with these settings holds `base_key` (what does not depend on
    the variant or seed, measured once). An interrupted table goes on where it stopped; the records can be committed
    and the table finished in another session. Returns every record with these settings."""
    records.mkdir(parents=True, exist_ok=True)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    done = load_records(records, settings)
    for seed in seeds:
        for variant in variants:
            path = records / f"seed{seed}-{variant}.json"
            if (variant, seed) in done:
                continue
            if path.exists():  # a record of this table under other settings
                raise ValueError(f"{path} holds a run with other settings than {settings}: give this table its "
                                 "own --records directory")
            first = not any(base_key in r for r in done.values())
            start = time.perf_counter()
            record = run(variant, seed, first)
            record |= {"variant": variant, "seed": seed, "settings": settings, "revision": revision,
                       "seconds": round(time.perf_counter() - start)}
            write_atomically(path, json.dumps(record) + "\n")
            done[(variant, seed)] = record
            print(f"seed {seed} {variant}: {record['seconds']} s", flush=True)
    return done


def mean_std(values: Sequence[float | None], digits: int = 3, se: bool = False) -> str:
    """`mean ± std` over the values that are not None (std 0 for one value; "-" for none), with the standard
    error std / sqrt(n) when `se`."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    cell = f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"
    return f"{cell} (se {std / len(values) ** 0.5:.{digits}f})" if se else cell
