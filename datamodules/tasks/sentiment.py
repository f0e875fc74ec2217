"""Sentiment: is a one-sentence review positive or negative? A procedural two-way classification task.

The default stream for label-level test-time adaptation. The label distribution is read at the answer slot
"The answer is" over " positive" / " negative". Measured on the default model (zero-shot, 100 reviews): it
answers " positive" for nearly every review (accuracy 0.5), yet the margin between the two verbalizers
separates the classes almost perfectly (0.97 when thresholded at its median): a label bias with the knowledge
intact, which is what test-time adaptation and prior correction claim to fix.
"""

from __future__ import annotations

from datamodules.tasks.base import ProceduralTask, Question, split_rng
from datamodules.tasks.extract import extract_word

POSITIVE = ("wonderful", "great", "excellent", "delightful", "fantastic", "lovely", "superb", "amazing", "enjoyable",
            "brilliant")
NEGATIVE = ("terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "poor", "unpleasant",
            "dull")
NOUNS = ("movie", "meal", "book", "concert", "trip", "hotel", "game", "show", "album", "class")


class Sentiment(ProceduralTask):
    """Args:
        seed: reviews of split s come from a generator seeded with (seed, s); labels alternate before any
            reordering by the stream.
        few_shot: zero-shot by default (the stream measured in the README).
    """

    name = "sentiment"
    verbalizers = (" positive", " negative")
    answer_prefix = "The answer is"

    def __init__(self, seed: int = 0, few_shot: int = 0, **kwargs) -> None:
        super().__init__(few_shot=few_shot, **kwargs)
        self.seed = seed

    def make(self, split: str, n: int) -> list[Question]:
        rng = split_rng(self.seed, split)
        out = []
        for i in range(n):
            label = ("positive", "negative")[i % 2]
            adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
            noun = rng.choice(NOUNS)
            out.append(Question(
                id=f"{split}-{i}", answer=label,
                question=f'Review: "The {noun} was {adjective}."\nIs this review positive or negative?',
                rationale=f"The review calls the {noun} {adjective}. The answer is {label}.",
            ))
        return out

    def extract(self, completion: str, finished: bool = True) -> str | None:
        """The label after "the answer is", else (finished replies) the first label word anywhere."""
        words = ("positive", "negative")
        found = extract_word(completion, words, finished)
        return found or (extract_word(f"the answer is {completion}", words) if finished else None)
