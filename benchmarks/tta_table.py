"""Online accuracy of test-time adaptation on the default stream: no adaptation, Tent, SAR, ROID, several seeds.

Each run is `labelfree fit -c configs/tta/<method>.yaml` (label level, default model) on a stream of
`--questions` one-sentence reviews (`Sentiment`; `--few-shot` exemplars, 0 by default) in the same `--order`
for every method; the seed changes the reviews and their order. Beside each method's online accuracy: the
non-adapted model on the same batches with the same prediction rule (`tta/source_accuracy`). Prints mean ± std
over seeds, with resets.

    python benchmarks/tta_table.py --seeds 0 1 2 --questions 96
    python benchmarks/tta_table.py --seeds 0 1 2 --questions 96 --order by_label
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tables import mean_std, run_grid  # benchmarks/tables.py, beside this script

from lightning_modules.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("tent", "sar", "roid")


def run(method: str, seed: int, args) -> dict:
    extra = [f"--data.init_args.tasks.init_args.seed={seed}", f"--seed_everything={seed}",
             f"--data.init_args.seed={seed}", f"--data.init_args.order={args.order}"]
    cli = build_cli([
        "fit", "-c", str(ROOT / "configs" / "tta" / f"{method}.yaml"),
        f"--data.init_args.num_questions={args.questions}",
        f"--data.init_args.tasks.init_args.few_shot={args.few_shot}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={args.runs}", *extra,
    ])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    resets = next((len(cb.reset_steps) for cb in cli.trainer.callbacks if hasattr(cb, "reset_steps")), 0)
    return {"online": metrics["tta/online_accuracy"], "source": metrics["tta/source_accuracy"], "resets": resets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--few-shot", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--order", default="random", choices=["random", "by_label"], help="the same for every method")
    parser.add_argument("--runs", default="runs/tta_table")
    args = parser.parse_args()

    start = time.perf_counter()
    results, _ = run_grid(args.methods, args.seeds, lambda method, seed, first: run(method, seed, args))

    print(f"\nstream: Sentiment, {args.questions} questions, {args.order} order, {args.few_shot}-shot, "
          f"seeds {args.seeds}, {time.perf_counter() - start:.0f} s")
    # each method's baseline is the same model without adaptation under the same prediction rule (ROID's
    # recipe reports prior-corrected predictions, so its baseline is prior correction alone)
    print("| method | online accuracy | same predictions without adaptation | resets |\n|---|---|---|---|")
    for method, rows in results.items():
        print(f"| {method} | {mean_std([r['online'] for r in rows])} | {mean_std([r['source'] for r in rows])} | "
              f"{sum(r['resets'] for r in rows)} |")


if __name__ == "__main__":
    main()
