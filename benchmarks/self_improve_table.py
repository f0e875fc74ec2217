"""Self-improvement on the demo task: base, the greedy self-training control, LMSI, Entropy-filter, Self-filter,
IWSI, SemiEvol (and RM-filter with `--reward-model DIR`), several seeds, held-out greedy accuracy with the
few-shot and the zero-shot prompt, and the pseudo-label audit. Prints a Markdown table.

Each run is `labelfree fit -c configs/self_improve/base.yaml -c configs/self_improve/<method>.yaml` with the
seed changing the unlabeled questions, the sampling and the training order; evaluation is on the same held-out
questions for every method. Standard error = std / sqrt(seeds). A run is ~15 minutes on 2 CPU cores: the whole
default table (7 methods x 3 seeds) takes about 5 hours.

    python benchmarks/self_improve_table.py --seeds 0 1 2
    python benchmarks/self_improve_table.py --methods lmsi iwsi --seeds 0 --questions 50 --eval-questions 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from callbacks.task_evaluation import TaskEvaluation
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("greedy_control", "lmsi", "entropy_filter", "self_filter", "iwsi", "semievol")


def run(method: str, seed: int, args) -> dict:
    overrides = [
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
        f"--data.init_args.num_questions={args.questions}",
        f"--data.init_args.task.init_args.seed={seed}", f"--model.init_args.policy.init_args.model={args.model}",
        f"--trainer.logger.init_args.save_dir={args.runs}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if method == "rm_filter":
        overrides.append(f"--data.init_args.reward_model={args.reward_model}")
    cli = build_cli(["-c", str(ROOT / "configs/self_improve/base.yaml"),
                     "-c", str(ROOT / f"configs/self_improve/{method}.yaml"), *overrides], run=False)
    few_shot = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TaskEvaluation))
    # held-out questions: the task's test split with a fixed seed, the same for every method and seed
    eval_task = Arithmetic(seed=1234)
    few_shot.task, few_shot.num_questions, few_shot.at_fit_start = eval_task, args.eval_questions, args.with_base
    zero_shot = TaskEvaluation(Arithmetic(seed=1234, few_shot=0), num_questions=args.eval_questions, k=0,
                               at_fit_start=args.with_base)
    cli.trainer.callbacks.append(zero_shot)
    cli.trainer.fit(cli.model, cli.datamodule)
    data = cli.datamodule
    report = data.reports[-1] if data.reports else {}
    final = report.get("selectors", [{}])[-1] if report else {}
    return {
        "few_shot": few_shot.results["fit_end"]["greedy_accuracy"],
        "zero_shot": zero_shot.results["fit_end"]["greedy_accuracy"],
        "base_few_shot": few_shot.results.get("fit_start", {}).get("greedy_accuracy"),
        "base_zero_shot": zero_shot.results.get("fit_start", {}).get("greedy_accuracy"),
        "base_maj": few_shot.results.get("fit_start", {}).get("maj@8"),
        "kept": report.get("kept"), "precision": final.get("precision"), "recall": final.get("recall"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--questions", type=int, default=100, help="unlabeled questions per run")
    parser.add_argument("--eval-questions", type=int, default=200, help="held-out questions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reward-model", help="a sequence-classification directory: adds the RM-filter")
    parser.add_argument("--runs", default="runs/self_improve_table")
    args = parser.parse_args()
    methods = args.methods + (["rm_filter"] if args.reward_model else [])

    results: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    for seed in args.seeds:
        for i, method in enumerate(methods):
            args.with_base = i == 0  # the base model is measured once per seed
            results[method].append(run(method, seed, args))
            print(f"seed {seed} {method}: {json.dumps(results[method][-1])}", flush=True)

    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f} (se {std / len(values) ** 0.5:.3f})"

    first = results[methods[0]]
    print(f"\n{len(args.seeds)} seeds, {args.questions} unlabeled questions per run, {args.eval_questions} held-out "
          f"questions, {time.perf_counter() - start:.0f} s")
    print("| method | few-shot greedy acc. | zero-shot greedy acc. | kept samples | kept precision | kept recall |")
    print("|---|---|---|---|---|---|")
    print(f"| base (no training) | {cell([r['base_few_shot'] for r in first])} | "
          f"{cell([r['base_zero_shot'] for r in first])} | - | - | - |")
    print(f"| base maj@8 (few-shot) | {cell([r['base_maj'] for r in first])} | - | - | - | - |")
    for method, rows in results.items():
        print(f"| {method} | {cell([r['few_shot'] for r in rows])} | {cell([r['zero_shot'] for r in rows])} | "
              f"{cell([r['kept'] for r in rows])} | {cell([r['precision'] for r in rows])} | "
              f"{cell([r['recall'] for r in rows])} |")


if __name__ == "__main__":
    main()
