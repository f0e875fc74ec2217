"""Self-improvement on the demo task: base, the greedy self-training control, LMSI, Entropy-filter, Self-filter,
IWSI, SemiEvol (and RM-filter with `--reward-model DIR`), several seeds, held-out greedy accuracy with the
few-shot and the zero-shot prompt, and the pseudo-label audit. Prints a Markdown table.

Each run is `labelfree fit -c configs/self_improve/base.yaml -c configs/self_improve/<method>.yaml` with the
seed changing the unlabeled questions, the sampling and the training order; evaluation is on the same held-out
questions for every method (the recipe's family, seed 1234). Standard error = std / sqrt(seeds). Every method of a
seed reads the same cached candidates (`<runs>/candidates`). The base model is evaluated once (greedy answers to
fixed questions do not depend on the seed).

    python benchmarks/self_improve_table.py --seeds 0 1 2
    python benchmarks/self_improve_table.py --methods lmsi iwsi --seeds 0 --questions 32 --eval-questions 50
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from paired import paired_rows  # benchmarks/paired.py, beside this script
from tables import mean_std, run_grid  # benchmarks/tables.py, beside this script

from callbacks.task_evaluation import TaskEvaluation
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("greedy_control", "lmsi", "entropy_filter", "self_filter", "iwsi", "semievol")


def run(method: str, seed: int, args, with_base: bool) -> dict:
    overrides = [
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
        f"--data.init_args.num_questions={args.questions}",
        f"--data.init_args.task.init_args.seed={seed}", f"--model.init_args.policy.init_args.model={args.model}",
        f"--trainer.logger.init_args.save_dir={args.runs}", f"--data.init_args.cache_dir={args.runs}/candidates",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    cli = build_cli(["-c", str(ROOT / "configs/self_improve/base.yaml"),
                     "-c", str(ROOT / f"configs/self_improve/{method}.yaml"), *overrides], run=False)
    if method == "rm_filter":  # the recipe's placeholder path, replaced before setup reads it
        cli.datamodule.selectors[-1].signal.model_dir = args.reward_model
    few_shot, zero_shot = [cb for cb in cli.trainer.callbacks if isinstance(cb, TaskEvaluation)]
    for evaluation in (few_shot, zero_shot):
        # held-out questions: the recipe's family with a fixed seed, the same for every method and seed
        task = evaluation.task
        evaluation.task = Arithmetic(task.a_range, task.b_range, seed=1234, few_shot=task.few_shot)
        evaluation.num_questions, evaluation.at_fit_start = args.eval_questions, with_base
    cli.trainer.fit(cli.model, cli.datamodule)
    data = cli.datamodule
    report = data.reports[-1] if data.reports else {}
    final = report.get("selectors", [{}])[-1] if report else {}
    correct = lambda evaluation, when: [r["greedy_correct"] for r in evaluation.predictions.get(when, [])]  # noqa: E731
    return {
        "few_shot_correct": correct(few_shot, "fit_end"), "zero_shot_correct": correct(zero_shot, "fit_end"),
        "base_few_shot_correct": correct(few_shot, "fit_start"),
        "base_zero_shot_correct": correct(zero_shot, "fit_start"),
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
    parser.add_argument("--questions", type=int, default=48, help="unlabeled questions per run")
    parser.add_argument("--eval-questions", type=int, default=100, help="held-out questions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reward-model", help="a sequence-classification directory: adds the RM-filter")
    parser.add_argument("--runs", default="runs/self_improve_table")
    args = parser.parse_args()
    methods = args.methods + (["rm_filter"] if args.reward_model else [])

    start = time.perf_counter()
    # the base model once: its greedy answers to fixed questions do not depend on the seed
    results, base = run_grid(methods, args.seeds, lambda method, seed, first: run(method, seed, args, first))
    cell = functools.partial(mean_std, se=True)

    n, p = args.eval_questions, base["base_few_shot"]
    print(f"\n{len(args.seeds)} seeds, {args.questions} unlabeled questions per run, {n} held-out questions "
          f"(binomial standard error of one accuracy ~{(p * (1 - p) / n) ** 0.5:.3f}), "
          f"{time.perf_counter() - start:.0f} s")
    print("| method | few-shot greedy acc. | zero-shot greedy acc. | kept samples | kept precision | kept recall |")
    print("|---|---|---|---|---|---|")
    print(f"| base (no training) | {base['base_few_shot']:.3f} | {base['base_zero_shot']:.3f} | - | - | - |")
    print(f"| base maj@8 (few-shot, seed {args.seeds[0]}) | {base['base_maj']:.3f} | - | - | - | - |")
    for method, rows in results.items():
        print(f"| {method} | {cell([r['few_shot'] for r in rows])} | {cell([r['zero_shot'] for r in rows])} | "
              f"{cell([r['kept'] for r in rows])} | {cell([r['precision'] for r in rows])} | "
              f"{cell([r['recall'] for r in rows])} |")
    for prompt in ("few_shot", "zero_shot"):
        baselines = {"base": [base[f"base_{prompt}_correct"]] * len(args.seeds)}
        baselines |= {m: [r[f"{prompt}_correct"] for r in results[m]] for m in ("greedy_control", "lmsi")
                      if m in results}
        print(f"\n{prompt.replace('_', '-')} greedy accuracy, paired difference (method - baseline) pooled over "
              "seeds by concatenating their held-out questions, 95% bootstrap interval, McNemar's exact p:")
        print("| method | " + " | ".join(f"vs {b}" for b in baselines) + " |\n|---|" + "---|" * len(baselines))
        print("\n".join(paired_rows(results, f"{prompt}_correct", baselines)))


if __name__ == "__main__":
    main()
