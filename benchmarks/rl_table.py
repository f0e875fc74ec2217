"""Online RL with self-computed rewards on the demo task: RLC, TTRL, self-certainty (Intuitor) and the gold-reward
oracle, several seeds. Held-out greedy accuracy before and after, plus what explains it: the accuracy of the
sampled answers early and late in training, and how well each reward tracks correctness (reward accuracy:
reward > 0.5 vs correct, for rewards in [0, 1]; reward ranking: how often a correct response of a group gets a
higher reward than an incorrect one, ties 1/2, which is what group-normalised advantages use). Prints a Markdown
table.

Each run is `labelfree fit -c configs/rl/<method>.yaml` (the oracle: `ttrl.yaml` with `GoldAnswer`), the seed
changing the training questions, the sampling and the initialisation order; the held-out questions are the same
for every run. The base model is evaluated once (greedy decoding of fixed questions does not depend on the seed).

    python benchmarks/rl_table.py --seeds 0 1 2 --steps 15 --eval-questions 100   # the README's table
    python benchmarks/rl_table.py --methods ttrl gold --seeds 0 --steps 5 --eval-questions 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
from paired import paired_rows  # benchmarks/paired.py, beside this script
from tables import mean_std, run_grid  # benchmarks/tables.py, beside this script

from callbacks.task_evaluation import TaskEvaluation
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rlc", "ttrl", "intuitor", "gold")


class History(L.Callback):
    """The per-step training figures the table summarises (only those each step computed)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(dict(pl_module.step_metrics))

    def mean(self, key: str, steps: slice = slice(None)) -> float | None:
        values = [s[key] for s in self.steps[steps] if key in s]
        return statistics.mean(values) if values else None


def run(method: str, seed: int, args, with_base: bool) -> dict:
    config = "ttrl" if method == "gold" else method
    overrides = [
        f"--seed_everything={seed}", f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}",
        f"--data.init_args.task.init_args.seed={seed}", f"--model.init_args.policy.init_args.model={args.model}",
        f"--trainer.max_steps={args.steps}", f"--trainer.logger.init_args.save_dir={args.runs}",
        f"--trainer.logger.init_args.name=rl_{method}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if method == "gold":
        overrides.append('--model.init_args.rewards=[{"class_path": "lightning_modules.signals.GoldAnswer"}]')
    cli = build_cli(["-c", str(ROOT / f"configs/rl/{config}.yaml"), *overrides], run=False)
    evaluation = TaskEvaluation(Arithmetic(seed=1234), num_questions=args.eval_questions, k=0,
                                at_fit_start=with_base)
    history = History()
    cli.trainer.callbacks.extend([evaluation, history])
    cli.trainer.fit(cli.model, cli.datamodule)
    early = slice(0, max(len(history.steps) // 4, 1))
    late = slice(-max(len(history.steps) // 4, 1), None)
    return {
        "after_correct": [r["greedy_correct"] for r in evaluation.predictions["fit_end"]],
        "base_correct": [r["greedy_correct"] for r in evaluation.predictions.get("fit_start", [])],
        "base": evaluation.results.get("fit_start", {}).get("greedy_accuracy"),
        "after": evaluation.results["fit_end"]["greedy_accuracy"],
        "sample_acc_early": history.mean("rl/sample_accuracy", early),
        "sample_acc_late": history.mean("rl/sample_accuracy", late),
        "reward_accuracy": history.mean("rl/reward_accuracy"),
        "reward_ranking": history.mean("rl/reward_ranking"),
        "kl_late": history.mean("rl/kl", late),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=15, help="training steps per run (the README's table: 15)")
    parser.add_argument("--eval-questions", type=int, default=100, help="held-out questions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default="runs/rl_table")
    args = parser.parse_args()

    start = time.perf_counter()
    # the base model once: greedy decoding of fixed questions does not depend on the seed
    results, first = run_grid(args.methods, args.seeds, lambda method, seed, first: run(method, seed, args, first))
    n, base = args.eval_questions, first["base"]
    print(f"\n{len(args.seeds)} seeds x {args.steps} steps, {n} held-out questions (binomial standard error of one "
          f"accuracy ~{(base * (1 - base) / n) ** 0.5:.3f}), {time.perf_counter() - start:.0f} s")
    print("| reward | held-out greedy acc. after | sampled acc. first → last quarter | reward accuracy | "
          "reward ranking | KL (last quarter) |")
    print("|---|---|---|---|---|---|")
    print(f"| base (no training) | {base:.3f} | - | - | - | - |")
    for method, rows in results.items():
        column = lambda key, digits=2: mean_std([r[key] for r in rows], digits)  # noqa: B023 (used at once)
        print(f"| {method} | {column('after', 3)} | {column('sample_acc_early')} → {column('sample_acc_late')} | "
              f"{column('reward_accuracy')} | {column('reward_ranking')} | {column('kl_late', 4)} |")
    baselines = {"base": [first["base_correct"]] * len(args.seeds)}
    if "gold" in results:
        baselines["gold"] = [r["after_correct"] for r in results["gold"]]
    print("\nheld-out greedy accuracy after, paired difference (method - baseline) pooled over seeds by concatenating "
          "their held-out questions, 95% bootstrap interval, McNemar's exact p:")
    print("| reward | " + " | ".join(f"vs {b}" for b in baselines) + " |\n|---|" + "---|" * len(baselines))
    print("\n".join(paired_rows(results, "after_correct", baselines)))


if __name__ == "__main__":
    main()
