"""Matrix-multiply speed per dtype on this machine, at the default model's layer shapes: which dtype to run in.

A CPU without bfloat16 instructions (no `avx512_bf16` / `amx_bf16` in /proc/cpuinfo) multiplies bfloat16
matrices several times slower than float32, and every engine (sampling, scoring, training) follows.

    python benchmarks/matmul_dtype.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# (in, out) of the default model's linear layers: attention/MLP in, MLP out, and the output head
SHAPES = ((576, 1536), (1536, 576), (576, 49152))


def gflops(dtype: torch.dtype, rows: int, fan_in: int, fan_out: int, repeats: int) -> float:
    weight, x = torch.randn(fan_out, fan_in, dtype=dtype), torch.randn(rows, fan_in, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
    return 2 * rows * fan_in * fan_out * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 512], help="tokens per multiply")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16 instructions: "
          f"{sorted(flags & {'avx512_bf16', 'amx_bf16'}) or 'none'}")
    print("| rows | in x out | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        for fan_in, fan_out in SHAPES:
            f32 = gflops(torch.float32, rows, fan_in, fan_out, args.repeats)
            bf16 = gflops(torch.bfloat16, rows, fan_in, fan_out, args.repeats)
            print(f"| {rows} | {fan_in} x {fan_out} | {f32:.1f} | {bf16:.1f} | {bf16 / f32:.2f}x |")


if __name__ == "__main__":
    main()
