"""One `QuestionDynamics` probe as `configs/rl/dynamics.yaml` sets it (32 validation questions x 8 samples at T 1.0
and a greedy answer each, 64 tokens, the default model) at two sampling batch sizes, side by side, alternating: what
the callback's default batch buys.

    python benchmarks/probe_batch.py          # batch 8 against 32 (the default)
"""

from __future__ import annotations

import argparse
import time

from side_by_side import machine  # benchmarks/side_by_side.py, beside this script
from tables import ROOT  # benchmarks/tables.py

from callbacks.dynamics import QuestionDynamics
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli, recipe_args
from lightning_modules.evaluation import evaluate
from lightning_modules.policy import Policy

RECIPE = ROOT / "configs" / "rl" / "dynamics.yaml"


def recipe_run(model: str) -> tuple[Policy, QuestionDynamics]:
    """The recipe's policy and probe, built as `labelfree fit` builds them from its `-c` files (nothing restated)."""
    cli = build_cli([*recipe_args(RECIPE), f"--model.init_args.policy.init_args.model={model}"], run=False)
    (probe,) = (c for c in cli.trainer.callbacks if isinstance(c, QuestionDynamics))
    return cli.model.policy, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs=2, default=[8, 32], help="questions per sampling batch: a b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    policy, probe = recipe_run(args.model)
    task = Arithmetic(b_range=(3, 20), seed=1234)
    questions = task.load(probe.split, probe.num_questions)
    greedy, sampled = probe.greedy, probe.sampled
    evaluate(policy, task, questions[:4], greedy, sampled, batch_size=4)  # warm-up
    seconds = {b: [] for b in args.batches}
    for _ in range(args.repeats):
        for batch in args.batches:
            start = time.perf_counter()
            found = evaluate(policy, task, questions, greedy, sampled, batch_size=batch)
            seconds[batch].append(time.perf_counter() - start)
            right = sum(r["majority"] == r["gold"] for r in found.rows)
            print(f"batch {batch}: {seconds[batch][-1]:.1f} s, majority right {right}/{len(questions)}", flush=True)
    a, b = (min(seconds[x]) for x in args.batches)
    print(f"{machine('cpu')}: a probe at batch {args.batches[1]} {b:.1f} s against {a:.1f} s at batch "
          f"{args.batches[0]}: {a / b:.2f}x")


if __name__ == "__main__":
    main()
