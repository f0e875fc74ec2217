"""The IWSI paper's datasets: gsm8k, svamp (numeric), aqua_rat, openbookqa, anli (multiple choice), strategyqa (yes/no).

Each loads from `data_path` (a local file in the common schema: question, answer, rationale, options, id;
`{split}` in the path is replaced by the split) or, when online and no path is given, from its `datasets` hub
name, mapped to the common schema by `from_hub`. Exemplars are the first `few_shot` training questions that
carry a rationale (or, lacking one, the gold answer sentence).
"""

from __future__ import annotations

import functools
import re

from datamodules.tasks.base import Question, Task
from datamodules.tasks.extract import extract_choice, extract_number, extract_word, same_number

LETTERS = "ABCDEFGHIJ"


class HubTask(Task):
    hub: tuple[str, str | None] = ("", None)  # (path, config)
    hub_splits: dict[str, str] = {}  # our split -> the hub's split

    def from_hub(self, row: dict, i: int) -> Question:
        raise NotImplementedError

    def load(self, split: str, limit: int | None = None) -> list[Question]:
        if self.data_path is not None:
            return super().load(split, limit)
        import datasets

        path, config = self.hub
        rows = datasets.load_dataset(path, config, split=self.hub_splits.get(split, split))
        n = len(rows) if limit is None else min(limit, len(rows))
        return [self.from_hub(rows[i], i) for i in range(n)]

    @functools.cache  # noqa: B019 - one small list per task object
    def exemplars(self) -> list[Question]:
        return self.load("train", max(self.few_shot, 1))


class NumericTask(HubTask):
    def extract(self, completion: str) -> str | None:
        return extract_number(completion)

    def same(self, a: str | None, b: str | None) -> bool:
        return same_number(a, b)


class MultipleChoiceTask(HubTask):
    n_options = 5

    def extract(self, completion: str) -> str | None:
        return extract_choice(completion, self.n_options)

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
