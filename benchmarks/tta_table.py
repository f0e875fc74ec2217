"""Test-time adaptation on shifted streams: every method against no adaptation, paired, 3 seeds (SPEC §9).

Streams (the same items for every method of a seed; the seed changes the items and their order):
- `label_bias`: Sentiment zero-shot, shuffled, label level: the model answers " positive" to nearly every review
  while its verbalizer margin separates the classes.
- `one_class`: the same reviews one class at a time (SAR's online imbalanced label shift).
- `mixed`: Sentiment zero-shot and Comparison 2-shot interleaved (mixed domains), label level.
- `format_shift`: Arithmetic, 2-shot for the first half of the stream, zero-shot after (a prompt-format shift; the
  chat template throughout), token level: the model answers (64 new tokens at most), the task extracts the answer.
Each method's learning rate is chosen among 0.1x, 1x and 10x its recipe's (`configs/tta/<recipe>.yaml`) by online
accuracy on a validation stream of the same kind built from the `train` split (seed 0), never on the reported
`test` stream. Reported: online accuracy pooled over seeds, the paired difference against no adaptation with a
95% bootstrap interval over items and McNemar's p, and the collapse signals: the share of the most frequent
prediction, the last batch's entropy, the resets. Every method of a seed runs in this one process.

    python benchmarks/tta_table.py --streams label_bias one_class mixed format_shift --seeds 0 1 2
    python benchmarks/tta_table.py --table   # the tables of the committed records (benchmarks/results/tta/)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tables import PAGES, write_page  # benchmarks/tables.py, beside this script

from callbacks.statistics import cell, paired_difference, pool
from lightning_modules.cli import build_cli, exit_status_on_signal, recipe_args, recipe_configs
from lightning_modules.storage import write_atomically

ROOT = Path(__file__).resolve().parents[1]
LABEL = {"none": "tent", "tent": "tent", "infomax": "infomax", "batch_calibration": "batch_calibration",
         "batch_calibration_log_probs": "batch_calibration", "roid": "roid", "sar": "sar",
         "tlm": "tlm"}  # method -> recipe (label-level "none" reuses Tent's policy)
TOKEN = {"none": "tent_token", "tent": "tent_token", "em_ft": "em_ft", "sar": "sar_token", "tlm": "tlm",
         "pseudo_label": "pseudo_label"}
NO_LR = {"none", "batch_calibration", "batch_calibration_log_probs"}
VARIANT = {"batch_calibration_log_probs": ["--model.init_args.method.init_args.average=log_probs"]}  # the option
SENTIMENT = '{"class_path": "datamodules.tasks.Sentiment", "init_args": {"seed": %d}}'
COMPARISON = '{"class_path": "datamodules.tasks.Comparison", "init_args": {"seed": %d, "few_shot": 2}}'
ARITHMETIC = '{"class_path": "datamodules.tasks.Arithmetic", "init_args": {"seed": %d, "few_shot": 2}}'


def stream_args(stream: str, seed: int, split: str, questions: int) -> tuple[str, list[str]]:
    """(level, data overrides) of a stream."""
    common = [f"--data.init_args.split={split}", f"--data.init_args.seed={seed}",
              f"--data.init_args.num_questions={questions}"]
    if stream == "label_bias":
        return "label", common + [f"--data.init_args.tasks={SENTIMENT % seed}", "--data.init_args.order=random"]
    if stream == "one_class":
        return "label", common + [f"--data.init_args.tasks={SENTIMENT % seed}", "--data.init_args.order=by_label"]
    if stream == "mixed":
        return "label", common + [f"--data.init_args.tasks=[{SENTIMENT % seed}, {COMPARISON % seed}]",
                                  "--data.init_args.order=random", f"--data.init_args.num_questions={questions // 2}"]
    return "token", common + [f"--data.init_args.tasks={ARITHMETIC % seed}", "--data.init_args.format_shift_at=0.5",
                              "--data.init_args.shifted_few_shot=0", "--data.init_args.shifted_template=chat",
                              "--data.init_args.batch_size=8", "--model.init_args.max_new_tokens=64"]


def recipe_lr(recipe: str) -> float:
    """The learning rate the recipe sets (the last of its composing files that sets one)."""
    import yaml

    lr = 1e-3
    for path in recipe_configs(ROOT / "configs" / "tta" / f"{recipe}.yaml"):
        optimizer = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args", {}).get("optimizer") or {}
        lr = (optimizer.get("init_args", {}) | optimizer.get("dict_kwargs", {})).get("lr", lr)
    return lr


def run(method: str, stream: str, seed: int, split: str, questions: int, lr: float | None, runs: str) -> dict:
    level, data = stream_args(stream, seed, split, questions)
    recipe = (LABEL if level == "label" else TOKEN)[method]
    args = [*recipe_args(ROOT / "configs" / "tta" / f"{recipe}.yaml"), f"--seed_everything={seed}", *data,
            f"--model.init_args.level={level}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={stream}_{method}"]
    if lr is not None:
        key = "dict_kwargs" if recipe.startswith("sar") else "init_args"
        args.append(f"--model.init_args.optimizer.{key}.lr={lr}")
    if method == "none":
        args.append("--model.init_args.method=lightning_modules.tta.NoAdaptation")
    args += VARIANT.get(method, [])
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    model, metrics = cli.model, cli.trainer.callback_metrics
    top = Counter(model.predicted).most_common(1)[0][1] / len(model.predicted)
    return {"outcomes": model.outcomes, "accuracy": sum(model.outcomes) / len(model.outcomes), "top_share": top,
            "entropy": float(metrics.get("tta/entropy", float("nan"))), "resets": len(model.reset_steps),
            "skipped": model.method.skipped_steps, "no_update": getattr(model.method, "no_update_steps", 0),
            "parsed": sum(p is not None for p in model.predicted) / len(model.predicted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["label_bias", "one_class", "mixed", "format_shift"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--questions", type=int, default=96, help="items per reported label-level stream")
    parser.add_argument("--token-questions", type=int, default=48, help="items per reported token-level stream")
    parser.add_argument("--validation-questions", type=int, default=48)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the stream's level")
    parser.add_argument("--no-sweep", action="store_true", help="keep each recipe's learning rate (say so)")
    parser.add_argument("--runs", default="runs/tta_table")
    parser.add_argument("--out", default="runs/tta_table/results.json")
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks/results/tta",
                        help="the committed results files (an --out each) that --table reads")
    parser.add_argument("--table", action="store_true",
                        help="print the tables of the records and write their page (docs/results/); run nothing")
    parser.add_argument("--pages", type=Path, default=PAGES, help="where --table writes its page")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # build_cli gets its own arguments
    if args.table:
        write_page("tta", "Test-time adaptation: the re-measured streams", "python benchmarks/tta_table.py --table",
                   lambda: print_records(args.records, args.seeds), args.pages)
        return

    start, results = time.perf_counter(), {}
    for stream in args.streams:
        level = stream_args(stream, 0, "test", 1)[0]
        methods = args.methods or list(LABEL if level == "label" else TOKEN)
        questions = args.questions if level == "label" else args.token_questions
        chosen = {}
        for method in methods:  # the learning rate, on the validation stream (train split, seed 0)
            base = recipe_lr((LABEL if level == "label" else TOKEN)[method])
            if method in NO_LR or args.no_sweep:
                chosen[method] = None if method in NO_LR else base
                continue
            scores = {lr: run(method, stream, 0, "train", args.validation_questions, lr, args.runs)["accuracy"]
                      for lr in (base / 10, base, base * 10)}
            chosen[method] = max(scores, key=lambda lr: (scores[lr], -abs(lr / base - 1)))  # ties: the recipe's
            print(f"{stream} {method}: validation {json.dumps(scores)} -> lr {chosen[method]:g}", flush=True)
        rows = {m: [] for m in methods}
        for seed in args.seeds:
            for method in methods:
                rows[method].append(run(method, stream, seed, "test", questions, chosen[method], args.runs))
                r = rows[method][-1]
                print(f"{stream} seed {seed} {method}: accuracy {r['accuracy']:.3f} top {r['top_share']:.2f} "
                      f"entropy {r['entropy']:.3f} resets {r['resets']}", flush=True)
        results[stream] = {"lr": chosen, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(args.out), json.dumps(results))
        print(table(stream, results[stream], args.seeds), flush=True)
    print(f"{time.perf_counter() - start:.0f} s on this machine ({platform.machine()}, {torch.get_num_threads()} "
          f"threads, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})")
    ratios = []
    for stream, result in results.items():
        accuracy = {m: sum(sum(r["outcomes"]) for r in runs) / sum(len(r["outcomes"]) for r in runs)
                    for m, runs in result["rows"].items()}
        best = max((m for m in accuracy if m != "none"), key=accuracy.get)
        ratios.append(f"{stream} {accuracy[best] / max(accuracy['none'], 1e-9):.3f} ({best})")
    print("online accuracy ratio, best method / no adaptation: " + ", ".join(ratios))


def print_records(records: Path, seeds) -> None:
    """Every stream's table from the results files under `records` (file by file, in name order)."""
    for path in sorted(records.glob("*.json")):
        for stream, result in json.loads(path.read_text()).items():
            print(f"\n## {stream} (`{path.relative_to(ROOT)}`)\n{table(stream, result, seeds)}")


def table(stream: str, result: dict, seeds) -> str:
    rows, none = result["rows"], result["rows"]["none"]
    lines = [f"\n{stream} (seeds {seeds}): accuracy pooled over seeds; difference vs no adaptation [95% CI], "
             "McNemar p; collapse signals; parsed answers; batches without an update (TLM)",
             "| method | lr | accuracy | vs none | top prediction share | last entropy | resets | parsed | no update |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in rows.items():
        a, b = pool([(r["outcomes"], n["outcomes"]) for r, n in zip(runs, none)])
        diff = "-" if method == "none" else cell(paired_difference(a, b))
        lr = result["lr"][method]
        lines.append(f"| {method} | {'-' if lr is None else f'{lr:g}'} | {sum(a) / len(a):.3f} | {diff} | "
                     f"{sum(r['top_share'] for r in runs) / len(runs):.2f} | "
                     f"{sum(r['entropy'] for r in runs) / len(runs):.3f} | {sum(r['resets'] for r in runs)} | "
                     f"{sum(r['parsed'] for r in runs) / len(runs):.3f} | {sum(r['no_update'] for r in runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with exit_status_on_signal():
        main()
