"""Grading on the field's own files: golds read from the official release files, the grader against human labels on
the default model's real completions, and an evaluation's accuracy with its 95% interval.

    python benchmarks/grading.py --gsm8k grade_school_math/data/test.jsonl --math500 math500.jsonl
    python benchmarks/grading.py --labels tests/fixtures/graded_completions.jsonl
    python benchmarks/grading.py --task gsm8k --predictions benchmarks/results/grading/gsm8k-4shot-test-greedy.jsonl

`--labels` reads rows {task, id, gold, completion, finish_reason, human_answer, human_correct} (a person read each
completion as a grader would: the answer it states, right or wrong against the gold) and prints every row where the
grader's verdict differs. The last line is the agreement (or, for `--predictions` alone, the accuracy).
"""

from __future__ import annotations

import argparse

import torch

from callbacks.statistics import bootstrap_interval
from datamodules.io import read_rows
from datamodules.tasks import GSM8K, MATH
from datamodules.tasks.extract import last_boxed, parse_gold, same_math

TASKS = {"gsm8k": GSM8K(few_shot=0), "math": MATH()}


def mean_interval(scores: list[bool]) -> str:
    x = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    low, high = bootstrap_interval(lambda idx: x[idx].mean().item(), len(x))
    return f"{x.mean().item():.3f} [{low:.3f}, {high:.3f}] (n = {len(x)})"


def gsm8k_golds(path: str) -> str:
    task = GSM8K(data_path=path, few_shot=0, on_bad_row="skip")
    read = task.load("test")
    return f"GSM8K {path}: {len(read)} golds read, {task.skipped_gold} unreadable"


def math500_golds(path: str) -> str:
    """Each gold against its solution's last box, with this grader and with math-verify used directly."""
    from math_verify import parse, verify

    rows = [r.data for r in read_rows(path)]
    ours = direct = 0
    for r in rows:
        boxed = last_boxed(r["solution"])
        ours += same_math(parse_gold(r["answer"]), parse_gold(boxed))
        direct += bool(verify(parse(f"${r['answer']}$"), parse(f"${boxed}$")))
    return (f"MATH-500 {path}: gold = the solution's last box for {ours} of {len(rows)} (this grader), "
            f"{direct} of {len(rows)} (math-verify directly)")


def agreement(path: str) -> tuple[int, int]:
    rows = [r.data for r in read_rows(path)]
    agree = 0
    for r in rows:
        task = TASKS[r["task"]]
        answer = task.answer(r["completion"], r["finish_reason"])
        verdict = task.same(answer, task.gold_answer(r["gold"]))
        if verdict == r["human_correct"]:
            agree += 1
        else:
            print(f"differs: {r['task']} {r['id']}: gold {r['gold']!r}, human read {r['human_answer']!r} "
                  f"({'right' if r['human_correct'] else 'wrong'}), grader read {answer!r}; "
                  f"ends {r['completion'][-80:]!r}")
    for name in TASKS:
        part = [r for r in rows if r["task"] == name]
        print(f"{name}: {len(part)} completions, {sum(r['human_correct'] for r in part)} right by the human labels, "
              f"{sum(r['human_answer'] is None for r in part)} without an answer")
    return agree, len(rows)


def predictions(paths: list[str], task_name: str) -> str:
    """Greedy completions graded again with this grader, pooled over files: `labelfree test`'s predictions files or
    the committed records of `benchmarks/results/grading/` (id, gold as read, completion, finish_reason)."""
    task = TASKS[task_name]
    rows = [r.data for path in paths for r in read_rows(path) if r.data["gold"] is not None]
    answers = [task.answer(r.get("completion", r.get("greedy_completion")),
                           r.get("finish_reason", r.get("greedy_finish", "stop"))) for r in rows]
    right = [task.same(a, r["gold"]) for a, r in zip(answers, rows)]
    unfinished = sum(r.get("finish_reason", r.get("greedy_finish")) == "length" for r in rows)
    return (f"{task_name} ({len(paths)} file(s)): greedy accuracy {mean_interval(right)}; "
            f"{sum(a is not None for a in answers)} parsed, {unfinished} hit the token limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", help="GSM8K's release test.jsonl")
    parser.add_argument("--math500", help="MATH-500's release test.jsonl")
    parser.add_argument("--labels", help="human-labeled completions (jsonl)")
    parser.add_argument("--predictions", nargs="*", default=[], help="predictions-*.jsonl files of `labelfree test`")
    parser.add_argument("--task", choices=sorted(TASKS), default="gsm8k", help="the task of --predictions")
    args = parser.parse_args()
    if args.gsm8k:
        print(gsm8k_golds(args.gsm8k))
    if args.math500:
        print(math500_golds(args.math500))
    if args.predictions:
        print(predictions(args.predictions, args.task))
    if args.labels:
        agree, n = agreement(args.labels)
        print(f"grader agreement with the human labels: {agree}/{n} = {agree / n:.3f}")


if __name__ == "__main__":
    main()
