"""Learning or sharpening, and where to stop without labels: every RL reward run long, probed question by question.

Each run is `benchmarks/rl_table.py`'s (the method's recipe, the demo family 2..12 x 3..20, 4 prompts per step) for
`--steps` steps at `--lr`, with, after every `--every` steps: held-out greedy accuracy on `--eval-questions`
questions (seed 1234, `test` split: reported, never used to pick anything but the gold-picked reference) and a
`QuestionDynamics` probe of `--probe-questions` validation questions (seed 1234, `valid` split) x `--k` samples at
T 1.0 (SPEC §11). Records: `benchmarks/results/rl_dynamics/seed<s>-<method>.json` (run in parts, like the tables).

The table: per method, held-out accuracy at the end, at the step the gold picks on the held-out questions (the
peak: a reference no label-free run can use) and at the step each label-free criterion picks from the probe
(`sharpened_agreement` and `vote_share` highest, `answer_entropy` lowest, the first step whose flip rate exceeds
0.5 less one probe), paired against the end over seeds (cluster bootstrap), and the share of the peak's gain over
the end each criterion recovers; then the per-question decomposition on the probe set at the end (audit: learned,
corrupted, stable right, stable wrong, solvable at the start, learned from zero).

    python benchmarks/dynamics_table.py --methods gold ttrl intuitor empo rent --seeds 0 1 2 --steps 100 --lr 1e-4
    python benchmarks/dynamics_table.py --lr 1e-3 --records benchmarks/results/rl_dynamics_lr1e-3  # the collapse lr
    python benchmarks/dynamics_table.py --table   # from the records; writes docs/results/dynamics.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paired import cell, number_clusters, paired_difference, pool  # benchmarks/paired.py, beside this script
from rl_table import REWARDS, accuracy, run  # benchmarks/rl_table.py, beside this script
from tables import PAGES, ROOT, load_records, mean_std, run_in_parts, write_page  # benchmarks/tables.py

from callbacks.dynamics import QuestionDynamics
from datamodules.tasks import Arithmetic
from lightning_modules.cli import exit_status_on_signal

AUDIT = ("learned", "corrupted", "stable_right", "stable_wrong", "solvable_at_start", "learned_from_zero")


def held_out_by_step(record: dict, base: list[bool], every: int, steps: int) -> dict[int, list[bool]]:
    """The run's held-out per-question outcomes by training step (step 0: the base model)."""
    out = {0: base}
    for when, scores in record["correct"].items():
        out[steps if when == "fit_end" else int(when.split("-")[1]) * every] = scores
    return out


def probe_share(phases: dict[str, float]) -> float:
    """The share of a run's time its probes took (the phases are exclusive: every one under a `probe`)."""
    return sum(v for k, v in phases.items() if "probe" in k.split("/")) / phases["total"]


def picks(record: dict, steps: int) -> dict[str, int]:
    """The step each label-free criterion picks from the run's probes (ties: the earliest)."""
    probes = record["probes"]
    figure = lambda name: [(p["figures"][name], p["step"]) for p in probes]  # noqa: E731
    out = {"end": steps,
           "max sharpened_agreement": max(figure("sharpened_agreement"), key=lambda v: (v[0], -v[1]))[1],
           "max vote_share": max(figure("vote_share"), key=lambda v: (v[0], -v[1]))[1],
           "min answer_entropy": min(figure("answer_entropy"), key=lambda v: (v[0], v[1]))[1]}
    flipped = [i for i, p in enumerate(probes) if p["figures"]["flip_rate"] > 0.5]
    out["before flip rate > 0.5"] = probes[max(flipped[0] - 1, 0)]["step"] if flipped else steps
    return out


def table(records: dict, args) -> None:
    base = next((r["base"] for r in records.values() if "base" in r), None)
    done = {m: [records[(m, s)] for s in args.seeds] for m in args.methods
            if all((m, s) in records for s in args.seeds)}
    if base is None or not done:
        print("no complete method in the records yet")
        return
    heldout = Arithmetic(b_range=(3, 20), seed=1234).load("test", len(base))
    clusters = number_clusters(heldout, len(args.seeds))
    print(f"{len(args.seeds)} seeds x {args.steps} steps at lr {args.lr:g}; held-out greedy accuracy on {len(base)} "
          f"questions every {args.every} steps (base {accuracy(base):.3f}); probe: {args.probe_questions} validation "
          f"questions x {args.k} samples")
    shares = [probe_share(r["phases"]) for runs in done.values() for r in runs if "phases" in r]
    if shares:
        print(f"the probe took {mean_std(shares, 2)} of a run's time ({len(shares)} runs; phase `probe`)")
    print("\n| method | criterion | steps picked | held-out acc. | vs end | share of the peak's gain |")
    print("|---|---|---|---|---|---|")
    for method, runs in done.items():
        series = [held_out_by_step(r, base, args.every, args.steps) for r in runs]
        peak = [max(s, key=lambda t, s=s: (accuracy(s[t]), -t)) for s in series]
        chosen = {"gold-picked peak (reference)": peak} | {
            name: [p[name] for p in (picks(r, args.steps) for r in runs)] for name in picks(runs[0], args.steps)}
        end = [s[args.steps] for s in series]
        gain = sum(accuracy(s[t]) for s, t in zip(series, peak)) - sum(map(accuracy, end))
        for name, steps in chosen.items():
            at = [s[t] for s, t in zip(series, steps)]
            diff = "-" if name == "end" else cell(paired_difference(*pool(list(zip(at, end))), clusters=clusters))
            share = (sum(map(accuracy, at)) - sum(map(accuracy, end))) / gain if gain > 0 else float("nan")
            print(f"| {method} | {name} | {', '.join(map(str, steps))} | {mean_std([accuracy(a) for a in at])} | "
                  f"{diff} | {'-' if name == 'end' else f'{share:.2f}'} |")
    print("\nthe probe questions' majority answers at the end against the start (audit, gold read for this table "
          "only), mean ± std over seeds:")
    print("| method | " + " | ".join(AUDIT) + " |\n|---|" + "---|" * len(AUDIT))
    for method, runs in done.items():
        last = [r["probes"][-1]["figures"] for r in runs]
        print(f"| {method} | " + " | ".join(mean_std([f[f"audit/{k}"] for f in last], 2) for k in AUDIT) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["gold", "ttrl", "intuitor", "empo", "rent"],
                        choices=list(REWARDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--every", type=int, default=10, help="steps between held-out evaluations and probes")
    parser.add_argument("--eval-questions", type=int, default=500)
    parser.add_argument("--probe-questions", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="samples per probe question")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default="runs/dynamics_table")
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks/results/rl_dynamics")
    parser.add_argument("--table", action="store_true", help="print the table from the records, write its page")
    parser.add_argument("--pages", type=Path, default=PAGES, help="where --table writes its page")
    args = parser.parse_args()
    settings = {"phase": "dynamics", "steps": args.steps, "lr": args.lr, "every": args.every,
                "eval_questions": args.eval_questions, "probe_questions": args.probe_questions, "k": args.k,
                "model": args.model}

    def one(method: str, seed: int, first: bool) -> dict:
        probe = QuestionDynamics(Arithmetic(b_range=(3, 20), seed=1234), split="valid",
                                 num_questions=args.probe_questions, k=args.k, temperature=1.0, max_new_tokens=64,
                                 every_n_steps=0, every_n_epochs=1, batch_size=8)
        return run(method, seed, args, first, args.steps, args.lr, "test", args.every, dynamics=probe)

    if args.table:
        records = load_records(args.records, settings)
        command = (f"python benchmarks/dynamics_table.py --table --steps {args.steps} --lr {args.lr:g} --seeds "
                   f"{' '.join(map(str, args.seeds))}")
        write_page("dynamics", "Per-question dynamics and label-free stopping", command,
                   lambda: table(records, args), args.pages)
        return
    table(run_in_parts(args.records, args.methods, args.seeds, one, settings, "base"), args)


if __name__ == "__main__":
    with exit_status_on_signal():
        main()
