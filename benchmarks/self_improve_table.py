"""Self-improvement on the demo task, powered: the base model, the greedy self-training control and every method over
several seeds, held-out greedy accuracy with the 2-shot and the zero-shot prompt on the same questions for every
method, paired differences against the control and against LMSI (95% bootstrap interval over questions, McNemar's
p, seeds pooled), the pseudo-label audit, LMSI and IWSI over two rounds (LMSI's round 2 also restarted from the
base weights, `lmsi_restart`: STaR's outer loop), LMSI for only the control's number of steps (`lmsi_short`), and
IWSI's keep fraction k swept on the same candidates (the paper's hyper-parameter figure).

Each run is `labelfree fit -c configs/self_improve/base.yaml -c configs/self_improve/<recipe>.yaml` with the seed
changing the unlabeled questions, the sampling and the training order; every variant of a seed reads the same
cached round-0 candidates (`<runs>/candidates`). Held-out questions: the recipe's family with a fixed seed (1234),
test split, the same for every method and seed; the base model is evaluated once. Nothing is tuned here: every
recipe runs with its shipped settings (lr 3e-4, one epoch per round); the k sweep is reported, not used to choose.

Runs in parts: each finished run writes a record (`<records>/seed<s>-<variant>.json`: the per-question scores,
the audit, its run time); a run with a record is not run again, so the table is built over several invocations
(and sessions, the records being committed). `--table` prints the table from the records alone.

    python benchmarks/self_improve_table.py --seeds 0 1 2
    python benchmarks/self_improve_table.py --table --plot docs/iwsi_k.png   # and the k sweep's figure
    python benchmarks/self_improve_table.py --variants lmsi iwsi --seeds 0 --questions 32 --eval-questions 50 \
        --records /tmp/records
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
from paired import cell, number_clusters, paired_difference, paired_rows, pool  # benchmarks/paired.py
from tables import PAGES, ROOT, load_records, mean_std, run_in_parts, write_page  # benchmarks/tables.py

from callbacks.round_restart import RestartEachRound
from callbacks.task_evaluation import TaskEvaluation
from datamodules.selection import DSWeightFilter, EntropyThreshold
from datamodules.tasks import Arithmetic
from lightning_modules.cli import build_cli, exit_status_on_signal
from lightning_modules.signals import DSWeight

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _iwsi(keep: float = 0.8, reference: bool = False):
    def tweak(cli):
        data = cli.datamodule
        for i, selector in enumerate(data.selectors):
            if isinstance(selector, DSWeightFilter):  # reference: IWSI's filter_data.py clip and index cut
                selector.signal.clip_like_reference = reference
                data.selectors[i] = DSWeightFilter(keep, "reference" if reference else "percentile", selector.signal)
    return tweak


def _semievol_reference(cli):
    data = cli.datamodule
    data.selectors = [EntropyThreshold(population="inconsistent") if isinstance(s, EntropyThreshold) else s
                      for s in data.selectors]  # the official code's reading (SPEC §4): 30th percentile


def _restart(cli):
    cli.trainer.callbacks.append(RestartEachRound())  # round 2 trains from the base weights (STaR)


def _control_steps(cli):
    # LMSI for as many steps as the greedy control takes (one batch per 8 questions, ~200 of its ~1,345 voted
    # samples): is the control's zero-shot edge its smaller amount of training?
    data = cli.datamodule.hparams
    cli.trainer.limit_train_batches = -(-data.num_questions // data.batch_size)


# variant -> (recipe, rounds, a change to the built run: its selectors or callbacks)
VARIANTS = {
    "greedy_control": ("greedy_control", 1, None),
    "lmsi": ("lmsi", 2, None),
    "lmsi_restart": ("lmsi", 2, _restart),
    "lmsi_short": ("lmsi", 1, _control_steps),
    "iwsi": ("iwsi", 2, _iwsi()),
    "iwsi_reference": ("iwsi", 1, _iwsi(reference=True)),
    "entropy_filter": ("entropy_filter", 1, None),
    "self_filter": ("self_filter", 1, None),
    "semievol": ("semievol", 1, None),
    "semievol_reference": ("semievol", 1, _semievol_reference),
    "empo_filter": ("empo_filter", 1, None),
    "deepconf_filter": ("deepconf_filter", 1, None),
    "self_certainty_filter": ("self_certainty_filter", 1, None),
    "iwsi_k50": ("iwsi", 1, _iwsi(0.5)),
    "iwsi_k65": ("iwsi", 1, _iwsi(0.65)),
    "iwsi_k95": ("iwsi", 1, _iwsi(0.95)),
}
SWEEP = {"iwsi_k50": 0.5, "iwsi_k65": 0.65, "iwsi (round 1)": 0.8, "iwsi_k95": 0.95}
PROMPTS = ("few_shot", "zero_shot")


def build(variant: str, seed: int, args, rounds: int | None = None):
    """The variant's run for this seed (`rounds` instead of the variant's own), built and not started:
    (LightningCLI, {prompt: its TaskEvaluation})."""
    recipe, own_rounds, tweak = VARIANTS[variant]
    rounds = rounds or own_rounds
    overrides = [
        f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
        f"--data.init_args.num_questions={args.questions}",
        f"--data.init_args.task.init_args.seed={seed}", f"--model.init_args.policy.init_args.model={args.model}",
        f"--trainer.logger.init_args.save_dir={args.runs}", f"--data.init_args.cache_dir={args.runs}/candidates",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    if recipe != "semievol":  # SemiEvol's own two epochs are its warm-up and its one round
        overrides += [f"--trainer.max_epochs={rounds}", "--trainer.reload_dataloaders_every_n_epochs=1"]
    cli = build_cli(["-c", str(ROOT / "configs/self_improve/base.yaml"),
                     "-c", str(ROOT / f"configs/self_improve/{recipe}.yaml"), *overrides], run=False)
    data = cli.datamodule
    for selector in data.selectors:
        for signal in selector.signals().values():
            if isinstance(signal, DSWeight):  # <= 5% of the unlabeled questions (SPEC §2)
                signal.valid_questions = max(1, args.questions // 20)
                signal.cache_dir = f"{args.runs}/scores"  # the pre-trained model's losses: scored once per seed
    if tweak is not None:
        tweak(cli)
    evaluations = dict(zip(PROMPTS, [cb for cb in cli.trainer.callbacks if isinstance(cb, TaskEvaluation)]))
    for evaluation in evaluations.values():
        # held-out questions: the recipe's family with a fixed seed, the same for every method and seed
        task = type(data.task)(**{**data.task.settings(), **evaluation.task_overrides, "seed": 1234})
        evaluation.task, evaluation.task_overrides = task, {}
        evaluation.num_questions, evaluation.every_n_epochs = args.eval_questions, 1 if rounds > 1 else 0
    return cli, evaluations


def run(variant: str, seed: int, args, with_base: bool) -> dict:
    cli, evaluations = build(variant, seed, args)
    data, rounds = cli.datamodule, VARIANTS[variant][1]
    for evaluation in evaluations.values():
        evaluation.at_fit_start = with_base
    cli.trainer.fit(cli.model, data)
    correct = lambda rows: [r["greedy_correct"] for r in rows]  # noqa: E731
    record = {
        "rounds": [{"kept": r.kept, "candidates": r.candidates,
                    "precision": r.selectors[-1]["precision"], "recall": r.selectors[-1]["recall"]}
                   for r in data.reports],
    }
    for prompt, evaluation in evaluations.items():
        record[prompt] = [correct(evaluation.predictions[f"epoch-{r}"]) for r in range(1, rounds)]
        record[prompt].append(correct(evaluation.predictions["fit_end"]))  # one list per round
        if with_base:
            record[f"base_{prompt}"] = correct(evaluation.predictions["fit_start"])
    return record


def accuracy(scores: list[bool]) -> float:
    return sum(scores) / len(scores)


def table(records: dict[tuple[str, int], dict], seeds: list[int], plot: Path | None = None) -> None:
    base = next((r for r in records.values() if "base_few_shot" in r), None)
    done = {}  # row name -> one record-like dict per seed, with every seed present
    for variant, (_, rounds, _) in VARIANTS.items():
        runs = [records.get((variant, s)) for s in seeds]
        if any(r is None for r in runs):
            continue
        for r in range(rounds):
            name = variant if rounds == 1 else f"{variant} (round {r + 1})"
            done[name] = [{p: run[p][r] for p in PROMPTS} | run["rounds"][r] for run in runs]
    if not done or base is None:
        print("no complete variant in the records yet")
        return
    n = len(base["base_few_shot"])
    # the held-out questions repeat products: the intervals resample products (all their questions, every seed)
    clusters = number_clusters(Arithmetic(b_range=(3, 20), seed=1234).load("test", n), len(seeds))
    difference = lambda pairs: paired_difference(*pool(pairs), clusters=clusters)  # noqa: E731
    minutes = sum(r["seconds"] for r in records.values() if r["seed"] in seeds) / 60
    print(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), {base['settings']['questions']} unlabeled questions "
          f"per run, {n} held-out questions; {minutes:.0f} min of runs in all")
    print("| method | 2-shot greedy acc. | zero-shot greedy acc. | kept samples | kept precision | kept recall |")
    print("|---|---|---|---|---|---|")
    print(f"| base (no training) | {accuracy(base['base_few_shot']):.3f} | {accuracy(base['base_zero_shot']):.3f} "
          "| - | - | - |")
    for name, rows in done.items():
        print(f"| {name} | " + " | ".join(mean_std([accuracy(r[p]) for r in rows]) for p in PROMPTS) + " | "
              + " | ".join(mean_std([r[k] for r in rows], 0 if k == "kept" else 3)
                           for k in ("kept", "precision", "recall")) + " |")
    for prompt in PROMPTS:
        baselines = {"base": [base[f"base_{prompt}"]] * len(seeds)}
        baselines |= {b: [r[prompt] for r in done[b]] for b in ("greedy_control", "lmsi (round 1)") if b in done}
        print(f"\n{prompt.replace('_', '-')} greedy accuracy, paired difference (method - baseline), seeds pooled, "
              "95% bootstrap interval over products (cluster bootstrap), McNemar's exact p:")
        print("| method | " + " | ".join(f"vs {b}" for b in baselines) + " |\n|---|" + "---|" * len(baselines))
        print("\n".join(paired_rows(done, prompt, baselines, clusters)))
        for method in ("lmsi", "lmsi_restart", "iwsi"):
            if f"{method} (round 2)" in done:
                pairs = [(r2[prompt], r1[prompt]) for r2, r1 in zip(done[f"{method} (round 2)"],
                                                                    done[f"{method} (round 1)"])]
                print(f"{method}, round 2 - round 1 of the same runs: {cell(difference(pairs))}")
        if {"lmsi (round 2)", "lmsi_restart (round 2)"} <= set(done):
            pairs = [(a[prompt], b[prompt]) for a, b in zip(done["lmsi_restart (round 2)"], done["lmsi (round 2)"])]
            print(f"LMSI round 2 from the base weights - from round 1's weights: {cell(difference(pairs))}")
    sweep = {k: done[v] for v, k in SWEEP.items() if v in done}
    if len(sweep) > 1 and 0.8 in sweep:
        against = {k: {p: difference([(r[p], r8[p]) for r, r8 in zip(rows, sweep[0.8])]) for p in PROMPTS}
                   for k, rows in sweep.items()}
        print("\nIWSI's keep fraction k (one round, the same candidates), paired difference against k = 0.8:")
        print("| k | kept | kept precision | 2-shot acc. | vs k = 0.8 | zero-shot acc. | vs k = 0.8 |\n"
              "|---|---|---|---|---|---|---|")
        for k, rows in sweep.items():
            cells = [c for p in PROMPTS for c in (mean_std([accuracy(r[p]) for r in rows]), cell(against[k][p]))]
            print(f"| {k} | {mean_std([r['kept'] for r in rows], 0)} | "
                  f"{mean_std([r['precision'] for r in rows])} | " + " | ".join(cells) + " |")
        if plot is not None:
            plot_sweep(against, plot, len(seeds))


def plot_sweep(against: dict[float, dict[str, dict]], path: Path, seeds: int) -> None:
    """The paper's hyper-parameter figure at our scale: held-out accuracy against IWSI's keep fraction k, drawn as
    the paired difference against k = 0.8 (the shipped default) with its 95% cluster-bootstrap interval."""
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    ks = sorted(against)
    for shift, prompt, label in zip((-0.006, 0.006), PROMPTS, ("2-shot", "zero-shot")):
        cells = [against[k][prompt] for k in ks]
        middle = [c["difference"] for c in cells]
        axis.errorbar([k + shift for k in ks], middle, fmt="o-", capsize=3, label=label,
                      yerr=[[m - c["low"] for m, c in zip(middle, cells)],
                            [c["high"] - m for m, c in zip(middle, cells)]])
    axis.axhline(0, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xticks(ks)
    axis.set_xlabel("keep fraction k (of the voted samples, lowest DS weight first)")
    axis.set_ylabel("held-out accuracy - at k = 0.8")
    axis.set_title(f"IWSI's k, one round, {seeds} seeds pooled (95% cluster-bootstrap intervals)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--questions", type=int, default=200, help="unlabeled questions per run")
    parser.add_argument("--eval-questions", type=int, default=500, help="held-out questions")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default="runs/self_improve_table")
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks/results/self_improve")
    parser.add_argument("--table", action="store_true",
                        help="print the table from the records and write its page (docs/results/); run nothing")
    parser.add_argument("--pages", type=Path, default=PAGES, help="where --table writes its page")
    parser.add_argument("--plot", type=Path, help="draw the k sweep's figure to this PNG (once k has two values)")
    args = parser.parse_args()
    settings = {"questions": args.questions, "eval_questions": args.eval_questions, "model": args.model}
    if args.table:
        records = load_records(args.records, settings)
        command = f"python benchmarks/self_improve_table.py --table --seeds {' '.join(map(str, args.seeds))}"
        write_page("self-training", "Self-training: the powered table", command,
                   lambda: table(records, args.seeds, args.plot), args.pages)
        return
    else:
        records = run_in_parts(args.records, args.variants, args.seeds,
                               lambda variant, seed, first: run(variant, seed, args, first), settings, "base_few_shot")
    table(records, args.seeds, args.plot)


if __name__ == "__main__":
    with exit_status_on_signal():
        main()
