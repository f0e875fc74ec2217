"""Learning or sharpening, and where to stop without labels: every method run long, probed question by question.

`--pipeline rl` (default): each run is `benchmarks/rl_table.py`'s (the method's recipe, the demo family 2..12 x 3..20,
4 prompts per step) for `--steps` steps at `--lr`, an epoch being `--every` steps. `--pipeline self_training`: each
run is `benchmarks/self_improve_table.py`'s LMSI or IWSI (`--questions` unlabeled questions) over `--rounds` rounds,
an epoch being a round. After every epoch: held-out greedy accuracy on `--eval-questions` questions (seed 1234,
`test` split, the zero-shot prompt for self-training, the format it trains on; reported, never used to pick anything
but the gold-picked reference) and a `QuestionDynamics` probe of `--probe-questions` validation questions (seed 1234,
`valid` split) x `--k` samples at T 1.0 (SPEC §11). Records: `benchmarks/results/rl_dynamics/` and
`benchmarks/results/self_improve_dynamics/` (`seed<s>-<method>.json`, run in parts, like the tables).

The table: per method, held-out accuracy at the end, at the epoch the gold picks on the held-out questions (the peak:
a reference no label-free run can use) and at the epoch each label-free criterion picks from the probes
(`sharpened_agreement` and `vote_share` highest, `answer_entropy` lowest, the last probe before the flip rate first
exceeds 0.5, or 0.3), paired against the end over seeds (cluster bootstrap), and the share of the peak's gain over
the end each criterion recovers (where the peak is measurably above the end: its interval above 0); then the
per-question decomposition on the probe set at the end (audit: learned, corrupted, stable right, stable wrong,
solvable at the start, learned from zero), the probe's share of a run's time (phase `probe`), and beside the page a
figure per section (`dynamics-<section>.png`: per method, held-out accuracy and the label-free criteria after every
epoch, each the mean over seeds).

    python benchmarks/dynamics_table.py --methods gold ttrl intuitor empo rent --seeds 0 1 2 --steps 100 --lr 1e-4
    python benchmarks/dynamics_table.py --methods ttrl cuma scrl --seeds 0 1 2 --steps 100 --lr 1e-4  # the guards
    python benchmarks/dynamics_table.py --steps 40 --lr 1e-3 --every 10 --records benchmarks/results/rl_dynamics_lr1e-3
    python benchmarks/dynamics_table.py --pipeline self_training --methods lmsi iwsi --rounds 3
    python benchmarks/dynamics_table.py --table   # from the records; writes docs/results/dynamics.md

A table (a section of the page) pools the seeds of `--seeds` that every method with a record in it has, and says
which.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

import matplotlib
from paired import cell, number_clusters, paired_difference, pool  # benchmarks/paired.py, beside this script
from tables import PAGES, ROOT, load_records, mean_std, run_in_parts, write_page  # benchmarks/tables.py

from callbacks.dynamics import QuestionDynamics
from datamodules.tasks import Arithmetic
from lightning_modules.cli import exit_status_on_signal
from lightning_modules.progress import phase

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CRITERIA = ("vote_share", "sharpened_agreement", "answer_entropy", "flip_rate")  # what the picks read, drawn
AUDIT = ("learned", "corrupted", "stable_right", "stable_wrong", "solvable_at_start", "learned_from_zero")
METHODS = {"rl": ("gold", "ttrl", "intuitor", "empo", "rent", "rlc", "cuma", "scrl"), "self_training": ("lmsi", "iwsi")}
DEFAULTS = {"rl": ["gold", "ttrl", "intuitor", "empo", "rent"], "self_training": ["lmsi", "iwsi"]}  # what a run runs
# the flip rate's thresholds: 0.5 is CollapseGuard's band in configs/rl/dynamics.yaml; 0.3 was set after lr 1e-3 seed
# 1 fell (its first probe flipped 0.375 of the majorities, no lr 1e-4 probe more than 0.22): tested only by the
# records measured after it (committed later: lr 1e-3 seed 2, the guards, seeds 1 and 2 at lr 1e-4)
FLIP_RATES = (0.5, 0.3)
GUARDS = ["cuma", "scrl"]  # TTRL with a guard against a wrong majority: paired against plain TTRL
# the learning rate at which the oracle collapsed within 20 steps (docs/results/rl.md, phase 1): shorter runs, probed
# more often; its own records and its own section of the page
COLLAPSE = {"steps": 40, "lr": 1e-3, "every": 10, "records": ROOT / "benchmarks/results/rl_dynamics_lr1e-3",
            "figure": "rl-lr1e-3"}


def probe() -> QuestionDynamics:
    """The probe of every run: after every epoch (an RL epoch of `--every` steps, a self-training round); uncached,
    so that every probe generates and its share of the run is a cost (a rerun of a killed run would read it)."""
    return QuestionDynamics(Arithmetic(b_range=(3, 20), seed=1234), split="valid", num_questions=ARGS.probe_questions,
                            k=ARGS.k, temperature=1.0, max_new_tokens=64, every_n_steps=0, every_n_epochs=1,
                            batch_size=8, cache=False)


def run_rl(method: str, seed: int, first: bool) -> dict:
    from rl_table import run  # benchmarks/rl_table.py, beside this script

    return run(method, seed, ARGS, first, ARGS.steps, ARGS.lr, "test", ARGS.every, dynamics=probe())


def run_self_training(method: str, seed: int, first: bool) -> dict:
    """LMSI or IWSI over `--rounds` rounds; held-out: the zero-shot prompt (the format trained on)."""
    from self_improve_table import build  # benchmarks/self_improve_table.py, beside this script

    cli, evaluations = build(method, seed, ARGS, rounds=ARGS.rounds)
    dynamics = probe()
    cli.trainer.callbacks.append(dynamics)
    # one held-out prompt is enough here (the few-shot one's fit-start maj@8 alone is minutes)
    cli.trainer.callbacks.remove(evaluations["few_shot"])
    evaluation = evaluations["zero_shot"]
    evaluation.at_fit_start = first
    cli.trainer.fit(cli.model, cli.datamodule)
    correct = {when: [r["greedy_correct"] for r in rows] for when, rows in evaluation.predictions.items()}
    return {"correct": {k: v for k, v in correct.items() if k != "fit_start"},
            **({"base": correct["fit_start"]} if first else {}), "phases": phase.report(),
            "rounds": [{"kept": r.kept, "precision": r.selectors[-1]["precision"]} for r in cli.datamodule.reports],
            "probes": [{"step": p["step"], "figures": p["figures"]} for p in dynamics.probes]}


def held_out_by_epoch(record: dict, base: list[bool]) -> list[list[bool]]:
    """The run's held-out per-question outcomes after each epoch, epoch 0 being the base model."""
    epochs = sorted(int(when.split("-")[1]) for when in record["correct"] if when != "fit_end")
    return [base, *(record["correct"][f"epoch-{e}"] for e in epochs), record["correct"]["fit_end"]]


def picks(record: dict) -> dict[str, int]:
    """The epoch each label-free criterion picks from the run's probes (probe i follows epoch i; ties: the
    earliest)."""
    probes = record["probes"]
    figure = lambda name: [(p["figures"][name], i) for i, p in enumerate(probes)]  # noqa: E731
    flipped = {t: [i for i, p in enumerate(probes) if p["figures"]["flip_rate"] > t] for t in FLIP_RATES}
    return {"end": len(probes) - 1,
            "max sharpened_agreement": max(figure("sharpened_agreement"), key=lambda v: (v[0], -v[1]))[1],
            "max vote_share": max(figure("vote_share"), key=lambda v: (v[0], -v[1]))[1],
            "min answer_entropy": min(figure("answer_entropy"), key=lambda v: (v[0], v[1]))[1],
            **{f"before flip rate > {t}": max(f[0] - 1, 0) if f else len(probes) - 1 for t, f in flipped.items()}}


def probe_share(phases: dict[str, float], held_out: bool = True) -> float:
    """The share of a run's time its probes took (the phases are exclusive: every one under a `probe`); without
    `held_out`, of the run's time less its held-out evaluations (what a run without labels pays)."""
    parts = {k: k.split("/") for k in phases if k != "total"}
    probe = sum(phases[k] for k, p in parts.items() if "probe" in p)
    evaluations = sum(phases[k] for k, p in parts.items() if "evaluation" in p and "probe" not in p)
    return probe / (phases["total"] - (0 if held_out else evaluations))


def table(records: dict, args) -> None:
    base = next((r["base"] for r in records.values() if "base" in r), None)
    present = [m for m in args.methods if any((m, s) in records for s in args.seeds)]
    seeds = [s for s in args.seeds if all((m, s) in records for m in present)]  # those every method present has
    done = {m: [records[(m, s)] for s in seeds] for m in present} if seeds else {}
    if base is None or not done:
        print("no complete method in the records yet")
        return
    rl = args.pipeline == "rl"
    unit = (lambda e: str(e * args.every)) if rl else str  # noqa: E731
    heldout = Arithmetic(b_range=(3, 20), seed=1234).load("test", len(base))
    clusters = number_clusters(heldout, len(seeds))
    run = f"{args.steps} steps at lr {args.lr:g}" if rl else f"{args.rounds} rounds"
    print(f"{len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))}) x {run}; held-out greedy "
          f"accuracy on {len(base)} questions after every {f'{args.every} steps' if rl else 'round'} (base "
          f"{mean(base):.3f}); probe: {args.probe_questions} validation questions x {args.k} samples")
    phases = [r["phases"] for runs in done.values() for r in runs if "phases" in r]
    if phases:
        print(f"the probe took {mean_std([probe_share(p) for p in phases], 2)} of a run's time, "
              f"{mean_std([probe_share(p, held_out=False) for p in phases], 2)} of it without the held-out "
              f"evaluations ({len(phases)} runs; phase `probe`)")
    print(f"\n| method | criterion | {'steps' if rl else 'rounds'} picked | held-out acc. | vs end | share of the "
          "peak's gain |\n|---|---|---|---|---|---|")
    held_out = {m: [held_out_by_epoch(r, base) for r in runs] for m, runs in done.items()}  # per seed, per epoch
    for method, runs in done.items():
        series = held_out[method]
        peak = [max(range(len(s)), key=lambda e, s=s: (mean(s[e]), -e)) for s in series]
        picked = [picks(r) for r in runs]
        chosen = {"gold-picked peak (reference)": peak} | {name: [p[name] for p in picked] for name in picked[0]}
        end = [s[-1] for s in series]
        gain = sum(mean(s[e]) for s, e in zip(series, peak)) - sum(map(mean, end))
        rows = {}  # criterion -> (epochs, held-out outcomes there, paired difference against the end)
        for name, epochs in chosen.items():
            at = [s[e] for s, e in zip(series, epochs)]
            rows[name] = epochs, at, None if name == "end" else paired_difference(*pool(list(zip(at, end))),
                                                                                    clusters=clusters)
        above = rows["gold-picked peak (reference)"][2]["low"] > 0  # a share only of a gain measurably above 0
        for name, (epochs, at, result) in rows.items():
            share = (f"{(sum(map(mean, at)) - sum(map(mean, end))) / gain:.2f}" if above
                     else "- (peak not above the end)")
            print(f"| {method} | {name} | {', '.join(map(unit, epochs))} | {mean_std([mean(a) for a in at])} | "
                  f"{'-' if result is None else cell(result)} | {'-' if result is None else share} |")
    guards = [m for m in GUARDS if m in done and "ttrl" in done]
    if guards:
        print("\nthe guards against plain TTRL on the same seeds, held-out accuracy at the end, paired (method - "
              "ttrl):")
        print("| method | held-out acc. | ttrl | difference |\n|---|---|---|---|")
        plain = [s[-1] for s in held_out["ttrl"]]
        for method in guards:
            ends = [s[-1] for s in held_out[method]]
            difference = paired_difference(*pool(list(zip(ends, plain))), clusters=clusters)
            print(f"| {method} | {mean_std([mean(e) for e in ends])} | {mean_std([mean(e) for e in plain])} "
                  f"| {cell(difference)} |")
    print("\nthe probe questions' majority answers at the end against the start (audit, gold read for this table "
          "only), mean ± std over seeds:")
    print("| method | " + " | ".join(AUDIT) + " |\n|---|" + "---|" * len(AUDIT))
    for method, runs in done.items():
        last = [r["probes"][-1]["figures"] for r in runs]
        print(f"| {method} | " + " | ".join(mean_std([f[f"audit/{k}"] for f in last], 2) for k in AUDIT) + " |")
    if args.table:
        path = args.pages / f"dynamics-{args.figure}.png"
        epochs = len(next(iter(done.values()))[0]["probes"])  # probe i follows epoch i
        plot(done, held_out, [e * args.every if rl else e for e in range(epochs)], "step" if rl else "round", path)
        print(f"\n![held-out accuracy and the label-free criteria over {'steps' if rl else 'rounds'}]({path.name})")


def plot(done: dict[str, list[dict]], held_out: dict[str, list[list[list[bool]]]], steps: list[int], unit: str,
         path: Path) -> None:
    """One panel per method: held-out accuracy (gold, for the reader; `held_out_by_epoch` of each run) and the
    probe's label-free criteria after every epoch, each the mean over seeds."""
    figure, axes = plt.subplots(1, len(done), figsize=(2.6 * len(done) + 0.6, 3.9), sharey=True, squeeze=False)
    for axis, (method, runs) in zip(axes[0], done.items()):
        accuracy = [mean(mean(s[e]) for s in held_out[method]) for e in range(len(steps))]
        axis.plot(steps, accuracy, "o-", color="black", linewidth=2, label="held-out acc. (gold)")
        for name in CRITERIA:
            axis.plot(steps, [mean([r["probes"][e]["figures"][name] for r in runs]) for e in range(len(steps))],
                      ".--", label=name.replace("_", " "))
        axis.set_title(f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})", fontsize=9)
        axis.set_xticks(steps)
        axis.set_xlabel(unit, fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylim(0, 1)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2 if len(done) == 1 else 5,
                  fontsize=7)
    figure.tight_layout(rect=(0, 0.2 if len(done) == 1 else 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=list(METHODS), default="rl")
    parser.add_argument("--methods", nargs="+", choices=[m for ms in METHODS.values() for m in ms],
                        help=f"default: {' '.join(DEFAULTS['rl'])} (rl), {' '.join(DEFAULTS['self_training'])} "
                             "(self_training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="rl: training steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="rl: learning rate")
    parser.add_argument("--every", type=int, default=20, help="rl: steps per epoch (a held-out evaluation and a probe)")
    parser.add_argument("--rounds", type=int, default=3, help="self_training: rounds")
    parser.add_argument("--questions", type=int, default=200, help="self_training: unlabeled questions per run")
    parser.add_argument("--eval-questions", type=int, default=500)
    parser.add_argument("--probe-questions", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="samples per probe question")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", help="default runs/dynamics_table/<pipeline>")
    parser.add_argument("--records", type=Path, help="default benchmarks/results/{rl,self_improve}_dynamics")
    parser.add_argument("--table", action="store_true", help="print the table from the records, write its page")
    parser.add_argument("--pages", type=Path, default=PAGES, help="where --table writes its page")
    ARGS = args = parser.parse_args()
    if args.table:
        def produce() -> None:
            for pipeline, title, overrides in (("rl", "Online RL", {}),
                                               ("rl", "Online RL at the learning rate the oracle collapsed", COLLAPSE),
                                               ("self_training", "Self-training", {})):
                print(f"\n## {title}\n")
                one = argparse.Namespace(**vars(for_pipeline(args, pipeline, methods=None)) | overrides)
                table(load_records(one.records, settings(one)), one)

        command = (f"python benchmarks/dynamics_table.py --table --steps {args.steps} --lr {args.lr:g} --every "
                   f"{args.every} --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}")
        write_page("dynamics", "Per-question dynamics and label-free stopping", command, produce, args.pages)
        return
    ARGS = args = for_pipeline(args, args.pipeline, args.methods)
    if wrong := [m for m in args.methods if m not in METHODS[args.pipeline]]:
        parser.error(f"--pipeline {args.pipeline} has no method {', '.join(wrong)}")
    run = run_rl if args.pipeline == "rl" else run_self_training
    table(run_in_parts(args.records, args.methods, args.seeds, run, settings(args), "base"), args)


def for_pipeline(args: argparse.Namespace, pipeline: str, methods: list[str] | None) -> argparse.Namespace:
    """The arguments of one pipeline's table, its defaults filled in."""
    rl = pipeline == "rl"
    one = argparse.Namespace(**vars(args))
    one.pipeline = pipeline
    one.methods = methods or DEFAULTS[pipeline] + (GUARDS if rl and args.table else [])
    one.runs = args.runs or f"runs/dynamics_table/{pipeline}"
    one.records = args.records or ROOT / f"benchmarks/results/{'rl' if rl else 'self_improve'}_dynamics"
    one.figure = pipeline
    return one


def settings(args: argparse.Namespace) -> dict:
    """What a record must have been made with to be in this table."""
    common = {"eval_questions": args.eval_questions, "probe_questions": args.probe_questions, "k": args.k,
              "model": args.model}
    if args.pipeline == "rl":
        return {"phase": "dynamics", "steps": args.steps, "lr": args.lr, "every": args.every} | common
    return {"phase": "dynamics_self_training", "rounds": args.rounds, "questions": args.questions} | common


ARGS: argparse.Namespace


if __name__ == "__main__":
    with exit_status_on_signal():
        main()
