"""QuestionDataModule: a task's questions as prompt token ids, for online RL (`fit`), evaluation (`test`) and
prediction.

Each batch: `questions` (the `Question` objects; gold is read for evaluation metrics only), `prefix_ids` (the
task's shared few-shot prefix), `suffix_ids` (one list per question), the task's `stop` strings and the `task`
itself (its answer extractor). The task is also exposed as `.task` for callbacks. Training batches are shuffled
once per epoch with `seed + epoch`; test and predict batches keep the split's order.
"""

from __future__ import annotations

import functools

import lightning as L
from torch.utils.data import DataLoader

from datamodules.collate import ShardedBatchSampler, ranks, train_loader
from datamodules.io import check_at_least
from datamodules.tasks.base import Question, Task
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import load_tokenizer, model_context


def collate_questions(questions: list[Question], task: Task, tokenizer) -> dict:
    parts = [task.prompt_parts(tokenizer, q) for q in questions]
    return {"questions": questions, "prefix_ids": parts[0].prefix_ids, "suffix_ids": [p.suffix_ids for p in parts],
            "stop": task.stop, "task": task}


class QuestionDataModule(L.LightningDataModule):
    """Args:
        task: the task (prompt template, extractor, loader).
        split: which split to serve for test/predict.
        train_split: which split to serve for fit (online RL).
        num_questions: how many questions of the split (procedural tasks generate exactly this many).
        batch_size: questions per batch.
        tokenizer: linked to the policy's model.
    """

    def __init__(self, task: Task, split: str = "test", num_questions: int = 100, batch_size: int = 8,
                 train_split: str = "train", seed: int = 0, tokenizer: str = DEFAULT_MODEL) -> None:
        super().__init__()
        check_at_least("QuestionDataModule", 1, num_questions=num_questions, batch_size=batch_size)
        self.save_hyperparameters(ignore=["task"])
        self.task, self.split, self.num_questions, self.batch_size = task, split, num_questions, batch_size
        self.tokenizer_name = tokenizer
        self.questions: list[Question] = []
        self.train_questions: list[Question] = []

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        context = model_context(self.tokenizer_name)
        if stage == "fit":
            self.train_questions = self.task.fit_prompts(
                self.tokenizer, self.task.load(self.hparams.train_split, self.num_questions), context)
        else:
            self.questions = self.task.fit_prompts(self.tokenizer, self.task.load(self.split, self.num_questions),
                                                   context)

    def _loader(self, questions: list[Question]) -> DataLoader:
        collate = functools.partial(collate_questions, task=self.task, tokenizer=self.tokenizer)
        return DataLoader(questions, batch_size=self.batch_size, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch (seed + epoch); under several ranks each serves its own batches (a prompt's group
        never straddles ranks); resumable mid-epoch (`--ckpt_path`)."""
        sampler = ShardedBatchSampler(len(self.train_questions), self.batch_size, seed=self.hparams.seed,
                                      **ranks(self.trainer))
        collate = functools.partial(collate_questions, task=self.task, tokenizer=self.tokenizer)
        return train_loader(self.train_questions, sampler, collate, self.trainer)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.questions)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.questions)
