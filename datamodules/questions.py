"""QuestionDataModule: a task's questions as prompt token ids, for evaluation (`labelfree test`) and prediction.

Each batch: `questions` (the `Question` objects, gold included for scoring only), `prefix_ids` (the task's
shared few-shot prefix) and `suffix_ids` (one list per question). The task is exposed as `.task` for callbacks.
"""

from __future__ import annotations

import functools

import lightning as L
from torch.utils.data import DataLoader

from datamodules.tasks.base import Question, Task
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import load_tokenizer


def collate_questions(questions: list[Question], task: Task, tokenizer) -> dict:
    parts = [task.prompt_parts(tokenizer, q) for q in questions]
    return {"questions": questions, "prefix_ids": parts[0].prefix_ids, "suffix_ids": [p.suffix_ids for p in parts],
            "stop": task.stop}


class QuestionDataModule(L.LightningDataModule):
    """Args:
        task: the task (prompt template, extractor, loader).
        split: which split to serve for test/predict.
        num_questions: how many questions of the split (procedural tasks generate exactly this many).
        batch_size: questions per batch.
        tokenizer: linked to the policy's model.
    """

    def __init__(self, task: Task, split: str = "test", num_questions: int = 100, batch_size: int = 8,
                 tokenizer: str = DEFAULT_MODEL) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task, self.split, self.num_questions, self.batch_size = task, split, num_questions, batch_size
        self.tokenizer_name = tokenizer
        self.questions: list[Question] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.questions:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
            self.questions = self.task.load(self.split, self.num_questions)

    def _loader(self) -> DataLoader:
        collate = functools.partial(collate_questions, task=self.task, tokenizer=self.tokenizer)
        return DataLoader(self.questions, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
