"""How well the default model does on candidate demo-task families: greedy accuracy, maj@m and pass@m.

A good demo family leaves room (greedy well inside 10%..70%) and signal (maj@m above greedy). Prints a
Markdown table; each row is one `Arithmetic(a_range, b_range)` on the same number of held-out questions.

    python benchmarks/task_fit.py --temperature 0.5                 # the default family
    python benchmarks/task_fit.py --family 2,12,3,20 --family 2,12,12,25 --questions 100 --few-shot 2 0
"""

from __future__ import annotations

import argparse
import time

import torch

from callbacks.task_evaluation import TaskEvaluation
from datamodules.tasks import Arithmetic
from lightning_modules.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--family", action="append", help="a_min,a_max,b_min,b_max (repeatable); default 2,12,12,25")
    parser.add_argument("--few-shot", type=int, nargs="+", default=[2])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("-m", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    policy = Policy(args.model, dtype=args.dtype, adapt="none").eval()
    families = [tuple(map(int, f.split(","))) for f in (args.family or ["2,12,12,25"])]
    evaluation = TaskEvaluation(k=args.m, temperature=args.temperature, max_new_tokens=128)
    print(f"model={args.model} dtype={args.dtype} questions={args.questions} m={args.m} T={args.temperature}")
    print(f"| a | b | shots | greedy | maj@{args.m} | pass@{args.m} | parsed (greedy) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for a0, a1, b0, b1 in families:
        for shots in args.few_shot:
            task = Arithmetic(a_range=(a0, a1), b_range=(b0, b1), few_shot=shots)
            start = time.perf_counter()
            with torch.no_grad():
                rows = evaluation.evaluate(policy, task, task.load("test", args.questions)).rows
            greedy, majority, any_right, parsed = (
                sum(bool(r[key]) for r in rows) / len(rows)
                for key in ("greedy_correct", "maj_correct", "pass", "greedy_answer")
            )
            print(f"| {a0}..{a1} | {b0}..{b1} | {shots} | {greedy:.2f} | {majority:.2f} | {any_right:.2f} | "
                  f"{parsed:.2f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
