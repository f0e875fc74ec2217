"""What the engine-vs-engine benchmarks share: the LoRA settings both engines get, and running each engine in its
own subprocess (so that its peak RSS and threads are its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(r=8, alpha=16, dropout=0.05, target_modules="all-linear")


def run_engines(script: str, args, engines: dict[str, Callable], meter) -> dict[str, dict] | None:
    """In a child (`args.engine` set): runs `engines[args.engine](args, meter)` seeded, prints `meter.result()` as
    JSON on the last line and returns None. In the parent: runs `script --engine NAME` with the same command line
    for every engine, one after the other, and returns {name: result}."""
    if args.engine:
        import torch

        torch.manual_seed(0)
        engines[args.engine](args, meter)
        print(json.dumps(meter.result()))
        return None
    results = {}
    for engine in engines:
        cmd = [sys.executable, script, "--engine", engine] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    return results
