"""Online RL with self-computed rewards on the demo task, long enough to move greedy accuracy: the gold-reward oracle,
RLC, TTRL, self-certainty (Intuitor), EMPO and RENT, several seeds, held-out greedy accuracy with paired differences
against the base model and the oracle, and what explains it over training: the accuracy of the sampled answers,
the reward's ranking of right over wrong answers within a group (what group-normalised advantages use; 0.5 = no
signal), the sampling entropy and the response length, first and last quarter. A collapse guard watches every run
(`CollapseGuard(action="log")`: sampling entropy below 0.05 or responses under 4 tokens for 3 steps) and the table
says whether any run collapsed.

Two phases, nothing tuned on the held-out questions:
1. `--find-steps`: the oracle (gold reward) for each learning rate in `--lrs`, `--max-steps` steps, its greedy
   accuracy on a validation split (seed 1234, split `valid`: not the held-out questions) after every epoch of
   `--every` steps. The first (lr, steps) whose paired difference against the base model on the validation split
   has a 95% interval above 0 is the setting of phase 2 (the best one otherwise, said so).
2. The table: every reward for `--steps` steps at `--lr`, held-out greedy accuracy (seed 1234, `test` split).
Each run is the method's recipe (`labelfree fit -c configs/rl/base.yaml -c configs/rl/<method>.yaml`; the oracle is
TTRL's with the gold reward), the seed changing the training questions' order, the sampling and the
initialisation; the training questions are the recipe's 80, cycled, from the self-improvement family
(2..12 x 3..20). Every run is a record under
`benchmarks/results/rl*/` (run in parts, like the self-improvement table; `--table` prints from the records).

    python benchmarks/rl_table.py --find-steps --lrs 1e-4 1e-3 --max-steps 100 --every 20
    python benchmarks/rl_table.py --steps 20 --lr 1e-4 --seeds 0 1 2  # phase 1 chose lr 1e-4, 20 steps
    python benchmarks/rl_table.py --steps 20 --lr 1e-4 --seeds 0 1 2 --table
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import lightning as L
from paired import cell, number_clusters, paired_difference, paired_rows  # benchmarks/paired.py, beside this script
from tables import PAGES, ROOT, load_records, mean_std, run_in_parts, write_page  # benchmarks/tables.py

from callbacks.collapse_guard import CollapseGuard
from callbacks.task_evaluation import TaskEvaluation
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli, exit_status_on_signal, recipe_args
from lightning_modules.progress import phase

REWARDS = {  # method -> (recipe, the reward that replaces the recipe's; None keeps it)
    "gold": ("ttrl", "GoldAnswer"),
    "rlc": ("rlc", None),
    "ttrl": ("ttrl", None),
    "intuitor": ("intuitor", None),
    "empo": ("empo", None),
    "rent": ("rent", None),
    "cuma": ("cuma", None),  # TTRL's reward with CuMa's mask (guards: against plain TTRL, same seeds)
    "scrl": ("scrl", None),  # SCRL's selective positives and entropy-gated negatives
}
FIGURES = ("rl/sample_accuracy", "rl/reward_ranking", "rl/entropy", "rl/response_length", "rl/kl",
           "rl/parsed_fraction", "rl/zero_advantage_groups")
GUARD = {"rl/entropy": (0.05, None), "rl/response_length": (4, None)}


class History(L.Callback):
    """The per-step training figures (those each step computed)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v for k, v in pl_module.step_metrics.items() if k in FIGURES})


def quarter_mean(steps: list[dict], key: str, last: bool) -> float | None:
    quarter = max(len(steps) // 4, 1)
    values = [s[key] for s in (steps[-quarter:] if last else steps[:quarter]) if key in s]
    return statistics.mean(values) if values else None


def run(method: str, seed: int, args, with_base: bool, steps: int, lr: float, split: str, every: int,
        dynamics: L.Callback | None = None) -> dict:
    """One run of `method`; `dynamics` (a `QuestionDynamics`) is added to its callbacks and its probes recorded."""
    recipe, reward = REWARDS[method]
    overrides = [
        f"--seed_everything={seed}", f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}",
        f"--data.init_args.task.init_args.seed={seed}", "--data.init_args.task.init_args.b_range=[3, 20]",
        f"--model.init_args.policy.init_args.model={args.model}", f"--trainer.max_steps={steps}",
        f"--model.init_args.optimizer.init_args.lr={lr}", f"--trainer.logger.init_args.save_dir={args.runs}",
        f"--trainer.logger.init_args.name=rl_{method}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.callbacks=[]",  # no checkpoint per step here
        f"--data.init_args.num_questions={every * 4}",  # one epoch = `every` steps of 4 prompts
    ]
    if reward is not None:
        overrides.append(f'--model.init_args.rewards=[{{"class_path": "lightning_modules.signals.{reward}"}}]')
    cli = build_cli([*recipe_args(ROOT / f"configs/rl/{recipe}.yaml"), *overrides], run=False)
    evaluation = TaskEvaluation(Arithmetic(b_range=(3, 20), seed=1234), split=split,
                                num_questions=args.eval_questions, k=0, at_fit_start=with_base,
                                every_n_epochs=1 if split == "valid" or dynamics is not None else 0,
                                batch_size=64)  # 96 questions: 65 s at batch 8, 27 s at 96, the same answers
    history, guard = History(), CollapseGuard(dict(GUARD), patience=3, action="log")
    cli.trainer.callbacks.extend([evaluation, history, guard] + ([dynamics] if dynamics is not None else []))
    cli.trainer.fit(cli.model, cli.datamodule)
    correct = {when: [r["greedy_correct"] for r in rows] for when, rows in evaluation.predictions.items()}
    return {"correct": {k: v for k, v in correct.items() if k != "fit_start"},
            **({"base": correct["fit_start"]} if with_base else {}),
            "history": history.steps, "collapse": guard.events, "phases": phase.report(),
            **({"probes": [{"step": p["step"], "figures": p["figures"]} for p in dynamics.probes]} if dynamics else {})}


def accuracy(scores: list[bool]) -> float:
    return sum(scores) / len(scores)


def find_steps(args) -> None:
    settings = {"phase": "find_steps", "max_steps": args.max_steps, "every": args.every,
                "eval_questions": args.eval_questions, "model": args.model}
    directory = args.records.with_name(args.records.name + "_oracle")
    records = load_records(directory, settings) if args.table else run_in_parts(
        directory, [f"gold-lr{lr:g}" for lr in args.lrs], [0],
        lambda variant, seed, first: run("gold", seed, args, first, args.max_steps, float(variant[7:]), "valid",
                                         args.every),
        settings, "base")
    if not records:
        print("no record of phase 1 yet")
        return
    if args.table:
        print("## Phase 1: steps and learning rate, the oracle on the validation split")
    base = next(r["base"] for r in records.values() if "base" in r)
    validation = Arithmetic(b_range=(3, 20), seed=1234).load("valid", len(base))
    print(f"\nthe oracle (gold reward, seed 0) on {len(base)} validation questions, 2-shot greedy; base "
          f"{accuracy(base):.3f}:")
    print("| lr | steps | validation acc. | vs base |\n|---|---|---|---|")
    chosen, best = None, (-1.0, None)
    for (variant, _), record in sorted(records.items()):
        for when, scores in record["correct"].items():
            epoch = args.max_steps // args.every if when == "fit_end" else int(when.split("-")[1])
            result = paired_difference(scores, base, clusters=number_clusters(validation, 1))
            print(f"| {variant[7:]} | {epoch * args.every} | {accuracy(scores):.3f} | {cell(result)} |")
            if chosen is None and result["low"] > 0:
                chosen = (variant[7:], epoch * args.every)
            best = max(best, (accuracy(scores), (variant[7:], epoch * args.every)))
    if chosen is not None:
        print(f"\nfirst (lr, steps) measurably above the base model on the validation split: {chosen}")
    else:
        print(f"\nno (lr, steps) is measurably above the base model on the validation split; the best: {best[1]} "
              f"(validation accuracy {best[0]:.3f})")


def table(args) -> None:
    settings = {"phase": "table", "steps": args.steps, "lr": args.lr, "eval_questions": args.eval_questions,
                "model": args.model}
    run_one = lambda method, seed, first: run(method, seed, args, first, args.steps, args.lr, "test",  # noqa: E731
                                              args.every)
    records = (load_records(args.records, settings) if args.table
               else run_in_parts(args.records, args.methods, args.seeds, run_one, settings, "base"))
    base = next((r["base"] for r in records.values() if "base" in r), None)
    if args.table:
        print("\n## Phase 2: every reward on the held-out questions")
    done = {m: [records[(m, s)] for s in args.seeds] for m in args.methods
            if all((m, s) in records for s in args.seeds)}
    if base is None or not done:
        print("no complete method in the records yet")
        return
    print(f"\n{len(args.seeds)} seeds x {args.steps} steps at lr {args.lr:g}, {len(base)} held-out questions (2-shot "
          f"greedy); {sum(r['seconds'] for r in records.values()) / 60:.0f} min of runs in all")
    print("| reward | held-out greedy acc. | sampled acc. first → last quarter | reward ranking | entropy first → "
          "last | response length first → last | parsed answers first → last | collapsed runs |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| base (no training) | {accuracy(base):.3f} | - | - | - | - | - | - |")
    for method, rows in done.items():
        def trend(key, digits=2, rows=rows):
            first = mean_std([quarter_mean(r["history"], key, False) for r in rows], digits)
            return f"{first} → {mean_std([quarter_mean(r['history'], key, True) for r in rows], digits)}"
        ranking = mean_std([statistics.mean(s["rl/reward_ranking"] for s in r["history"] if "rl/reward_ranking" in s)
                            for r in rows])
        collapsed = [f"seed {r['seed']} at step {r['collapse'][0]['step']}" for r in rows if r["collapse"]]
        print(f"| {method} | {mean_std([accuracy(r['correct']['fit_end']) for r in rows])} | "
              f"{trend('rl/sample_accuracy')} | {ranking} | {trend('rl/entropy')} | "
              f"{trend('rl/response_length', 1)} | {trend('rl/parsed_fraction')} | {', '.join(collapsed) or 'none'} |")
    results = {m: [{"after": r["correct"]["fit_end"]} for r in rows] for m, rows in done.items()}
    baselines = {"base": [base] * len(args.seeds)}
    if "gold" in results:
        baselines["gold"] = [r["after"] for r in results["gold"]]
    print("\nheld-out greedy accuracy, paired difference (method - baseline), seeds pooled, 95% bootstrap interval "
          "over products (cluster bootstrap), McNemar's exact p:")
    print("| reward | " + " | ".join(f"vs {b}" for b in baselines) + " |\n|---|" + "---|" * len(baselines))
    heldout = Arithmetic(b_range=(3, 20), seed=1234).load("test", len(base))
    print("\n".join(paired_rows(results, "after", baselines, number_clusters(heldout, len(args.seeds)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (--find-steps chose 20)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (--find-steps chose 1e-4)")
    parser.add_argument("--find-steps", action="store_true", help="phase 1: the oracle on the validation split")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20, help="steps per epoch (a validation evaluation each)")
    parser.add_argument("--eval-questions", type=int, default=500, help="held-out (or validation) questions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default="runs/rl_table")
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks/results/rl")
    parser.add_argument("--table", action="store_true",
                        help="print both phases' tables from the records and write their page (docs/results/)")
    parser.add_argument("--pages", type=Path, default=PAGES, help="where --table writes its page")
    args = parser.parse_args()
    if args.table:
        command = (f"python benchmarks/rl_table.py --table --steps {args.steps} --lr {args.lr:g} --seeds "
                   f"{' '.join(map(str, args.seeds))}")
        write_page("rl", "Online RL: the powered table", command, lambda: (find_steps(args), table(args)), args.pages)
        return
    find_steps(args) if args.find_steps else table(args)


if __name__ == "__main__":
    with exit_status_on_signal():
        main()
