"""The IWSI paper's datasets: gsm8k, svamp (numeric), aqua_rat, openbookqa, anli (multiple choice), strategyqa
(yes/no); and MATH (boxed LaTeX answers: the benchmark TTRL, EMPO and Intuitor report, as MATH-500).

One parsing path: `from_row` reads a row of the dataset's official release, whether it comes from a local file
(`data_path`; `{split}` in the path is replaced by the split) or, when online and no path is given, from the
hub's copy (`hub`). The formats read, each as its public repository distributes it:
- gsm8k (openai/grade-school-math `data/{train,test}.jsonl`): `question`, `answer` = rationale with `<<...>>`
  calculator annotations (removed) and a last line `#### N` (the gold);
- svamp (arkilpatel/SVAMP `SVAMP.json`, a JSON list): `ID`, `Body`, `Question`, `Answer` (a float);
- aqua_rat (google-deepmind/AQuA `{train,dev,test}.json`, JSON lines): `question`, `options` ("A)21"),
  `rationale`, `correct`;
- openbookqa (`Data/Main/{train,dev,test}.jsonl`): `id`, `question: {stem, choices: [{text, label}]}`,
  `answerKey` (the hub's flat `question_stem` / `choices: {text, label}` too);
- anli (`anli_v1.0/R{1,2,3}/{train,dev,test}.jsonl`): `uid`, `context` (or `premise`), `hypothesis`,
  `label` "e"/"n"/"c" (the hub's 0/1/2 too), `reason`;
- strategyqa (`strategyqa_{train,test}.json`, a JSON list): `qid`, `question`, `answer` (bool; absent in the
  test file), `facts`;
- MATH-500 (as released: `problem`, `solution`, `answer`, `subject`, `level`, `unique_id`): the gold is `answer`;
  where it disagrees with the solution's last `\\boxed{}` the row is named in a warning.
Rows in the common schema (question, answer, rationale, options, id) load too. A row that is neither is an
error naming the file and line. Exemplars are the first `few_shot` rows of `exemplar_split` (`train`), carved
out of any split that reads the same source.
"""

from __future__ import annotations

import logging
import re

from datamodules.io import DataError, Row, read_rows
from datamodules.tasks.base import MathAnswers, Question, Task, common_question
from datamodules.tasks.extract import Comparison, extract_choice, extract_word, last_boxed, parse_gold, same_math

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJ"
_CALCULATOR = re.compile(r"<<[^>]*>>")


class HubTask(Task):
    hub: tuple[str, str | None] = ("", None)  # (path, config)
    hub_splits: dict[str, str] = {}  # our split -> the hub's split

    def from_row(self, row: dict, i: int) -> Question:
        """One row of the official release (or of the common schema) as a `Question`; a missing field raises."""
        raise NotImplementedError

    def _rows(self, split: str, limit: int | None) -> list[Row]:
        if self.data_path is not None:
            return read_rows(self.data_path.replace("{split}", split))[:limit]
        import datasets

        path, config = self.hub
        hub_split = self.hub_splits.get(split, split)
        rows = datasets.load_dataset(path, config, split=hub_split)
        n = len(rows) if limit is None else min(limit, len(rows))
        return [Row(rows[i], f"hub:{path}[{hub_split}] row {i}") for i in range(n)]

    def _load(self, split: str, limit: int | None) -> list[Question]:
        questions = []
        for i, row in enumerate(self._rows(split, limit)):
            try:
                q = self.from_row(row.data, i)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise DataError(f"{row.where}: not a {self.name} row in its release format or the common schema "
                                f"({type(e).__name__}: {e})") from None
            if not isinstance(q.question, str) or not q.question.strip():
                raise DataError(f"{row.where}: the question is missing or empty")
            q.meta["where"] = row.where
            questions.append(q)
        ids = [q.id for q in questions]
        if len(set(ids)) != len(ids):
            raise DataError(f"{self.source(split)}: question ids are not unique")
        return questions

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

    def extract(self, completion: str, finished: bool = True) -> str | None:
        return extract_choice(completion, self.n_options, finished)

    def gold_answer(self, raw: str) -> str | None:
        """"B", "(b)", " B) " -> "B"; None unless one of the first `n_options` letters."""
        letter = raw.strip().strip("()").strip().upper()
        return letter if len(letter) == 1 and 0 <= ord(letter) - ord("A") < self.n_options else None

    def format_rationale(self, q: Question) -> str:
        return super().format_rationale(Question(q.id, q.question, f"({q.answer})", q.rationale, q.options))


class GSM8K(NumericTask):
    name = "gsm8k"
    hub = ("openai/gsm8k", "main")

    def from_row(self, row: dict, i: int) -> Question:
        solution = row.get("answer")
        if not isinstance(solution, str) or "####" not in solution:  # the common schema
            return common_question(row, i)
        rationale, _, answer = solution.rpartition("####")
        rationale = _CALCULATOR.sub("", rationale).strip()
        answer = answer.strip().replace(",", "")
        return Question(str(row.get("id", f"gsm8k-{i}")), row["question"], answer,
                        f"{rationale}\nThe answer is {answer}." if rationale else None)


class SVAMP(NumericTask):
    name = "svamp"
    hub = ("ChilleD/SVAMP", None)

    def from_row(self, row: dict, i: int) -> Question:
        if "Question" not in row:
            return common_question(row, i)
        body = row["Body"].strip()
        question = f"{body} {row['Question'].strip()}" if body else row["Question"].strip()
        value = float(row["Answer"])
        answer = str(int(value)) if value == int(value) else str(value)
        return Question(str(row.get("ID", f"svamp-{i}")), question, answer)


class AQuA(MultipleChoiceTask):
    name = "aqua_rat"
    hub = ("deepmind/aqua_rat", "raw")

    def from_row(self, row: dict, i: int) -> Question:
        if "correct" not in row:
            return common_question(row, i)
        options = [re.sub(r"^\s*[A-E]\s*\)\s*", "", o) for o in row["options"]]
        return Question(str(row.get("id", f"aqua-{i}")), row["question"], row["correct"], row.get("rationale"), options)


class OpenBookQA(MultipleChoiceTask):
    name = "openbookqa"
    n_options = 4
    hub = ("allenai/openbookqa", "main")

    def from_row(self, row: dict, i: int) -> Question:
        if "answerKey" not in row:
            return common_question(row, i)
        if isinstance(row.get("question"), dict):  # the release: question {stem, choices [{text, label}]}
            stem, choices = row["question"]["stem"], row["question"]["choices"]
            pairs = [(c["label"], c["text"]) for c in choices]
        else:  # the hub: question_stem, choices {text: [...], label: [...]}
            stem, choices = row["question_stem"], row["choices"]
            pairs = list(zip(choices["label"], choices["text"]))
        if [label for label, _ in pairs] != list(LETTERS[: len(pairs)]):
            raise ValueError(f"choices labelled {[label for label, _ in pairs]}, expected A, B, ...")
        return Question(str(row.get("id", f"obqa-{i}")), stem, row["answerKey"], None, [t for _, t in pairs])


class ANLI(MultipleChoiceTask):
    """ANLI as three options; `round` picks A1/A2/A3 (hub splits train_r1, dev_r1, test_r1, ...; the release's
    files are `R1/{train,dev,test}.jsonl`)."""

    name = "anli"
    n_options = 3
    hub = ("facebook/anli", None)
    OPTIONS = ["entailment", "neutral", "contradiction"]
    RELEASE_LABELS = {"e": 0, "n": 1, "c": 2}

    def __init__(self, round: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round = round
        self.hub_splits = {s: f"{h}_r{round}" for s, h in (("train", "train"), ("validation", "dev"),
                                                            ("dev", "dev"), ("test", "test"))}

    def from_row(self, row: dict, i: int) -> Question:
        if "hypothesis" not in row:
            return common_question(row, i)
        premise = row["context"] if "context" in row else row["premise"]
        label = row["label"]
        index = self.RELEASE_LABELS[label] if isinstance(label, str) else int(label)
        question = f"Premise: {premise}\nHypothesis: {row['hypothesis']}\nDoes the premise entail the hypothesis?"
        return Question(str(row.get("uid", f"anli-{i}")), question, LETTERS[index], row.get("reason") or None,
                        list(self.OPTIONS))


class StrategyQA(HubTask):
    name = "strategyqa"
    hub = ("ChilleD/StrategyQA", None)

    def from_row(self, row: dict, i: int) -> Question:
        if "qid" not in row and "facts" not in row:
            return common_question(row, i)
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, bool):
            raise ValueError(f"answer {answer!r} is not true/false")
        facts = row.get("facts")
        rationale = " ".join(facts) if isinstance(facts, list) else facts
        return Question(str(row.get("qid", f"sqa-{i}")), row["question"],
                        None if answer is None else "yes" if answer else "no", rationale or None)

    def extract(self, completion: str, finished: bool = True) -> str | None:
        return extract_word(completion, ("yes", "no"), finished)

    def gold_answer(self, raw: str) -> str | None:
        word = {"true": "yes", "false": "no"}.get(raw.strip().lower(), raw.strip().lower())
        return word if word in ("yes", "no") else None


class MATH(NumericTask):
    """MATH problems with LaTeX answers (the MATH-500 release: problem, solution, answer, subject, level,
    unique_id; files in the common schema load too). The answer is read from the last `\\boxed{}` of a completion
    (else the answer sentence) and compared with math-verify. Zero-shot by default, with the instruction the
    R1-style recipes (TTRL, EMPO, Intuitor) use; the hub copy is HuggingFaceH4/MATH-500 (a `test` split only: with
    few_shot > 0 set `exemplar_split: test`, and the exemplars are carved out of it)."""

    name = "math"
    numeric_gold = False
    hub = ("HuggingFaceH4/MATH-500", None)
    answer_sentence = "The answer is $\\boxed{{{answer}}}$."

    def __init__(self, few_shot: int = 0,
                 system_prompt: str | None = "Please reason step by step, and put your final answer within \\boxed{}.",
                 **kwargs) -> None:
        super().__init__(few_shot=few_shot, system_prompt=system_prompt, **kwargs)

    def from_row(self, row: dict, i: int) -> Question:
        if "problem" not in row:
            return common_question(row, i)
        solution, answer = row.get("solution"), row.get("answer")
        boxed = last_boxed(solution) if isinstance(solution, str) else None
        if answer is None:
            answer = boxed
        elif boxed is not None and not same_math(parse_gold(str(answer)), parse_gold(boxed)):
            log.warning("math: row %d: gold %r differs from its solution's last \\boxed{%s}; the gold is used",
                        i, answer, boxed)
        return Question(str(row.get("unique_id", f"math-{i}")), row["problem"], None if answer is None else str(answer),
                        solution, meta={k: row[k] for k in ("subject", "level") if k in row})
