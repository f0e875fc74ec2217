"""The IWSI paper's datasets: gsm8k, svamp (numeric), aqua_rat, openbookqa, anli (multiple choice), strategyqa
(yes/no); and MATH (boxed LaTeX answers: the benchmark TTRL, EMPO and Intuitor report, as MATH-500).

Each loads from `data_path` (a local file in the common schema: question, answer, rationale, options, id;
`{split}` in the path is replaced by the split) or, when online and no path is given, from its `datasets` hub
name, mapped to the common schema by `from_hub`. Exemplars are the first `few_shot` rows of `exemplar_split`
(`train`), carved out of any split that reads the same source.
"""

from __future__ import annotations

import re

from datamodules.io import DataError, read_rows
from datamodules.tasks.base import MathAnswers, Question, Task
from datamodules.tasks.extract import Comparison, extract_choice, extract_word

LETTERS = "ABCDEFGHIJ"


class HubTask(Task):
    hub: tuple[str, str | None] = ("", None)  # (path, config)
    hub_splits: dict[str, str] = {}  # our split -> the hub's split

    def from_hub(self, row: dict, i: int) -> Question:
        raise NotImplementedError

    def _load(self, split: str, limit: int | None) -> list[Question]:
        if self.data_path is not None:
            return super()._load(split, limit)
        import datasets

        path, config = self.hub
        rows = datasets.load_dataset(path, config, split=self.hub_splits.get(split, split))
        n = len(rows) if limit is None else min(limit, len(rows))
        return [self.from_hub(rows[i], i) for i in range(n)]

    def source(self, split: str) -> str:
        if self.data_path is not None:
            return super().source(split)
        path, config = self.hub
        return f"hub:{path}:{config}:{self.hub_splits.get(split, split)}"


class NumericTask(MathAnswers, HubTask):
    """Args:
        comparison: `value` (math-verify equivalence) or `truncate` (the IWSI paper's int(float(x))).
    """

    def __init__(self, comparison: Comparison = "value", **kwargs) -> None:
        super().__init__(**kwargs)
        self.comparison = comparison


class MultipleChoiceTask(HubTask):
    n_options = 5

    def extract(self, completion: str) -> str | None:
        return extract_choice(completion, self.n_options)

    def gold_answer(self, raw: str) -> str | None:
        """"B", "(b)", " B) " -> "B"; None unless one of the first `n_options` letters."""
        letter = raw.strip().strip("()").strip().upper()
        return letter if len(letter) == 1 and 0 <= ord(letter) - ord("A") < self.n_options else None

    def format_rationale(self, q: Question) -> str:
        return super().format_rationale(Question(q.id, q.question, f"({q.answer})", q.rationale, q.options))


class GSM8K(NumericTask):
    name = "gsm8k"
    hub = ("openai/gsm8k", "main")

    def from_hub(self, row: dict, i: int) -> Question:
        rationale, _, answer = row["answer"].partition("####")
        rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()  # calculator annotations
        answer = answer.strip().replace(",", "")
        return Question(f"gsm8k-{i}", row["question"], answer, f"{rationale} The answer is {answer}.")


class SVAMP(NumericTask):
    name = "svamp"
    hub = ("ChilleD/SVAMP", None)

    def from_hub(self, row: dict, i: int) -> Question:
        body = row["Body"].strip()
        question = f"{body} {row['Question'].strip()}" if body else row["Question"].strip()
        value = float(row["Answer"])
        answer = str(int(value)) if value == int(value) else str(value)
        return Question(str(row.get("ID", f"svamp-{i}")), question, answer)


class AQuA(MultipleChoiceTask):
    name = "aqua_rat"
    hub = ("deepmind/aqua_rat", "raw")

    def from_hub(self, row: dict, i: int) -> Question:
        options = [re.sub(r"^[A-E]\)\s*", "", o) for o in row["options"]]
        return Question(f"aqua-{i}", row["question"], row["correct"], row["rationale"], options)


class OpenBookQA(MultipleChoiceTask):
    name = "openbookqa"
    n_options = 4
    hub = ("allenai/openbookqa", "main")

    def from_hub(self, row: dict, i: int) -> Question:
        options = row["choices"]["text"]
        return Question(row.get("id", f"obqa-{i}"), row["question_stem"], row["answerKey"], None, options)


class ANLI(MultipleChoiceTask):
    """ANLI as three options; `round` picks A1/A2/A3 (hub splits train_r1, dev_r1, test_r1, ...)."""

    name = "anli"
    n_options = 3
    hub = ("facebook/anli", None)
    OPTIONS = ["entailment", "neutral", "contradiction"]

    def __init__(self, round: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round = round
        self.hub_splits = {s: f"{h}_r{round}" for s, h in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    def from_hub(self, row: dict, i: int) -> Question:
        question = (f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n"
                    "Does the premise entail the hypothesis?")
        return Question(row.get("uid", f"anli-{i}"), question, LETTERS[row["label"]], row.get("reason") or None,
                        list(self.OPTIONS))

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "round": self.round}


class StrategyQA(HubTask):
    name = "strategyqa"
    hub = ("ChilleD/StrategyQA", None)

    def from_hub(self, row: dict, i: int) -> Question:
        facts = row.get("facts")
        rationale = " ".join(facts) if isinstance(facts, list) else facts
        return Question(row.get("qid", f"sqa-{i}"), row["question"], "yes" if row["answer"] else "no", rationale)

    def extract(self, completion: str) -> str | None:
        return extract_word(completion, ("yes", "no"))

    def gold_answer(self, raw: str) -> str | None:
        word = {"true": "yes", "false": "no"}.get(raw.strip().lower(), raw.strip().lower())
        return word if word in ("yes", "no") else None


class MATH(NumericTask):
    """MATH problems with LaTeX answers (the MATH-500 schema: problem, solution, answer, unique_id; files in the
    common schema load too). The answer is read from the last `\\boxed{}` of a completion (else the answer
    sentence) and compared with math-verify. Zero-shot by default, with the instruction the R1-style recipes
    (TTRL, EMPO, Intuitor) use; the hub copy is HuggingFaceH4/MATH-500 (a `test` split only: with few_shot > 0
    set `exemplar_split: test`, and the exemplars are carved out of it)."""

    name = "math"
    numeric_gold = False
    hub = ("HuggingFaceH4/MATH-500", None)
    answer_sentence = "The answer is $\\boxed{{{answer}}}$."

    def __init__(self, few_shot: int = 0,
                 system_prompt: str | None = "Please reason step by step, and put your final answer within \\boxed{}.",
                 **kwargs) -> None:
        super().__init__(few_shot=few_shot, system_prompt=system_prompt, **kwargs)

    def from_hub(self, row: dict, i: int) -> Question:
        if "problem" not in row:  # the common schema
            return Question(str(row.get("id", i)), row["question"], _text(row.get("answer")), row.get("rationale"))
        return Question(str(row.get("unique_id", f"math-{i}")), row["problem"], _text(row.get("answer")),
                        row.get("solution"), meta={k: row[k] for k in ("subject", "level") if k in row})

    def _load(self, split: str, limit: int | None) -> list[Question]:
        if self.data_path is None:
            return super()._load(split, limit)
        rows = read_rows(self.data_path.replace("{split}", split))[:limit]
        for row in rows:
            text = row.data.get("problem", row.data.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{row.where}: missing or empty field 'problem' (or 'question')")
        return [self.from_hub(r.data, i) for i, r in enumerate(rows)]


def _text(value) -> str | None:
    return None if value is None else str(value)
