"""The grader against human labels on the default model's real completions: 150 GSM8K test questions (4-shot,
greedy) and 100 MATH-500 problems (zero-shot, greedy), drawn at random from `labelfree test` runs. A person read
each completion as a grader would, blind to the grader's reading, and wrote down the answer it states (none for a
completion cut off at the token limit before stating one) and whether it is right. `benchmarks/grading.py
--labels tests/fixtures/graded_completions.jsonl` prints the same figures and every disagreement."""

import json

from tiny import ROOT

from datamodules.tasks import GSM8K, MATH

LABELS = ROOT / "tests" / "fixtures" / "graded_completions.jsonl"
TASKS = {"gsm8k": GSM8K(few_shot=0), "math": MATH()}


def _rows() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]


def _verdict(row: dict) -> tuple[str | None, bool]:
    task = TASKS[row["task"]]
    answer = task.answer(row["completion"], row["finish_reason"])
    return answer, task.same(answer, task.gold_answer(row["gold"]))


def test_the_fixture_holds_a_few_hundred_real_completions_of_both_benchmarks():
    rows = _rows()
    assert len(rows) == 250 and {r["task"]: 0 for r in rows}.keys() == {"gsm8k", "math"}
    assert all(r["finish_reason"] in ("eos", "stop", "length") and isinstance(r["human_correct"], bool) for r in rows)


def test_the_grader_agrees_with_the_human_verdicts():
    rows = _rows()
    differ = [r["id"] for r in rows if _verdict(r)[1] != r["human_correct"]]
    assert len(differ) <= 0.01 * len(rows), differ  # 99% agreement or better (measured: 250 of 250)


def test_the_grader_reads_the_answer_a_person_reads_on_gsm8k():
    """Not only right or wrong: the answer itself, on every GSM8K completion (the human's "none" included)."""
    task = TASKS["gsm8k"]
    misread = []
    for r in (r for r in _rows() if r["task"] == "gsm8k"):
        answer, _ = _verdict(r)
        human = r["human_answer"]
        read_alike = answer is None if human is None else task.same(answer, task.gold_answer(human.rstrip("%")))
        if not read_alike:
            misread.append((r["id"], answer, human))
    assert len(misread) <= 1, misread  # measured: 150 of 150
