"""Comparison: "which of two numbers is larger?", a procedural two-way classification task (labels A / B).

A label-level stream for test-time adaptation (the mixed-domain stream interleaves it with `Sentiment`, the
default stream of `configs/tta/base.yaml`): the label distribution is read at the answer slot "The answer is ("
over the verbalizers "A" and "B". The default model answers it greedily about 60% of the time (docs/tta.md), so
adaptation has room either way.
"""

from __future__ import annotations

from datamodules.tasks.base import ProceduralTask, Question, split_rng
from datamodules.tasks.extract import extract_choice


class Comparison(ProceduralTask):
    """Args:
        low, high: inclusive range of the two numbers.
        seed: questions of split s come from a generator seeded with (seed, s).
    """

    name = "comparison"
    verbalizers = ("A", "B")
    answer_prefix = "The answer is ("

    def __init__(self, low: int = 100, high: int = 999, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.low, self.high, self.seed = low, high, seed

    def make(self, split: str, n: int) -> list[Question]:
        rng = split_rng(self.seed, split)
        out = []
        for i in range(n):
            x, y = rng.sample(range(self.low, self.high + 1), 2)
            letter = "A" if x > y else "B"
            out.append(Question(
                id=f"{split}-{i}", question="Which number is larger?", answer=letter, options=[str(x), str(y)],
                rationale=f"{max(x, y)} is larger than {min(x, y)}. The answer is ({letter}).",
            ))
        return out

    def extract(self, completion: str, finished: bool = True) -> str | None:
        return extract_choice(completion, 2, finished)
