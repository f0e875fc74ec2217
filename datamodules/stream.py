"""StreamDataModule: an ordered test stream for test-time adaptation, with the shifts of the TTA literature.

- `order="by_label"`: one class after another (SAR's online imbalanced label shift); `"random"`: shuffled once.
- `format_shift_at=f`: from fraction f of the stream on, prompts switch to `shifted_few_shot` exemplars and the
  `shifted_template` (a change of prompt format mid-stream).
- several `tasks`: interleaved one question at a time (mixed domains).
Batches: `questions`, `tasks` (the Task objects: the answer extraction of the token level), `prompt_ids` (each
item's generation prompt, for the token level: any task, open-ended ones included). Classification streams (every
task has verbalizers, all as many) add `input_ids`/`attention_mask` (left-padded label prompts ending at the answer
slot), `labels` (gold index, for evaluation only) and `verbalizer_ids` (B, C); otherwise `label_problem` says why
not, and the label level refuses the stream at setup with it. Where every item has a text view (options rotated,
or the exemplars reversed: `_view`), `view_input_ids`/`view_attention_mask`/`view_perm` (B, C) give it.
The stream is served in order, never shuffled.
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.collate import ShardedBatchSampler, ranks, train_loader
from datamodules.tasks.base import Question, Task
from lightning_modules.batching import pad
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import load_tokenizer


def collate_stream(items: list[dict], pad_token_id: int) -> dict:
    batch = {"questions": [it["question"] for it in items], "tasks": [it["task"] for it in items],
             "prompt_ids": [it["prompt_ids"] for it in items]}
    if "label" in items[0]:  # a classification stream: the label prompts, left-padded to end at the answer slot
        batch["input_ids"], batch["attention_mask"], _ = pad([it["ids"] for it in items], pad_token_id, left=True)
        batch["labels"] = torch.tensor([it["label"] for it in items])
        batch["verbalizer_ids"] = torch.tensor([it["verbalizer_ids"] for it in items])  # (B, C)
    if "view_ids" in items[0]:  # the same items under a text view (ROID's consistency term)
        batch["view_input_ids"], batch["view_attention_mask"], _ = pad([it["view_ids"] for it in items], pad_token_id,
                                                                       left=True)
        batch["view_perm"] = torch.tensor([it["view_perm"] for it in items])  # (B, C)
    return batch


class StreamDataModule(L.LightningDataModule):
    """Args:
        tasks: one task, or several interleaved (mixed domains).
        split, num_questions: questions per task.
        order: `random` (shuffled once with `seed`) or `by_label` (one class at a time).
        format_shift_at: fraction of the stream after which the prompt format changes (None: no change).
        shifted_few_shot, shifted_template: the prompt format after the shift.
        batch_size: samples per adaptation step.
        tokenizer: linked to the policy's model.
    """

    def __init__(
        self, tasks: Task | list[Task], split: str = "test", num_questions: int = 200,
        order: Literal["random", "by_label"] = "random", format_shift_at: float | None = None,
        shifted_few_shot: int = 0, shifted_template: Literal["chat", "plain"] = "plain", batch_size: int = 16,
        seed: int = 0, tokenizer: str = DEFAULT_MODEL,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tasks"])
        self.tasks = tasks if isinstance(tasks, list) else [tasks]
        self.task = self.tasks[0]  # for callbacks that read a datamodule's task
        self.items: list[dict] = []
        self.label_problem: str | None = None  # why label-level adaptation cannot run on this stream (None: it can)
        self.view_problem: str | None = None  # why the items have no text view (None: they have)

    def setup(self, stage: str | None = None) -> None:
        if self.items:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        per_task = [[(task, q) for q in task.load(hp.split, hp.num_questions)] for task in self.tasks]
        n_classes = {len(task.verbalizers or ()) for task in self.tasks}
        unlabeled = [task.name for task in self.tasks if not task.verbalizers]
        if unlabeled:
            self.label_problem = f"task {unlabeled[0]!r} has no verbalizers (an open-ended task)"
        elif len(n_classes) != 1:
            self.label_problem = f"the stream's tasks have different numbers of verbalizers {sorted(n_classes)}"
        if hp.order == "by_label" and self.label_problem:
            raise ValueError(f"order: by_label serves one class at a time, but {self.label_problem}")
        stream = [pair for group in zip(*per_task) for pair in group]  # interleaved, as long as the shortest
        if hp.order == "random":
            random.Random(hp.seed).shuffle(stream)
        else:
            stream.sort(key=lambda pair: pair[0].label_index(pair[1]))  # stable: keeps the interleaving
        shift_from = len(stream) if hp.format_shift_at is None else int(hp.format_shift_at * len(stream))
        shifted = {id(t): self._shifted(t) for t in self.tasks}
        self.items = [
            self._item(shifted[id(task)] if i >= shift_from else task, q) for i, (task, q) in enumerate(stream)
        ]
        if self.view_problem:  # views for every item or for none
            for item in self.items:
                item.pop("view_ids", None), item.pop("view_perm", None)

    def _shifted(self, task: Task) -> Task:
        other = copy.copy(task)
        other.few_shot, other.template = self.hparams.shifted_few_shot, self.hparams.shifted_template
        return other

    def _item(self, task: Task, q: Question) -> dict:
        item = {"prompt_ids": task.prompt_parts(self.tokenizer, q).ids, "question": q, "task": task}
        if self.label_problem is None:
            item |= {"ids": task.label_prompt_ids(self.tokenizer, q), "label": task.label_index(q),
                     "verbalizer_ids": task.verbalizer_ids(self.tokenizer)}
            view = self._view(task, q)
            if view is None:
                self.view_problem = (f"task {task.name!r} has neither options to permute nor two exemplars to "
                                     "reorder, so its items have no text view")
            else:
                item["view_ids"], item["view_perm"] = view
        return item

    def _view(self, task: Task, q: Question) -> tuple[list[int], list[int]] | None:
        """The item's label prompt under a text view, and `perm`: the view's class j is the item's class perm[j].
        Options are rotated by one (A B C -> B C A, mapped back through `perm`); without options, two or more
        exemplars are shown in reverse order (the classes unchanged)."""
        n = len(task.verbalizers)
        if q.options and len(q.options) == n > 1:
            perm = list(range(1, n)) + [0]
            return task.label_prompt_ids(self.tokenizer, replace(q, options=[q.options[j] for j in perm])), perm
        if task.few_shot >= 2:
            other = copy.copy(task)
            other.exemplars = lambda: list(reversed(task.exemplars()))
            return other.label_prompt_ids(self.tokenizer, q), list(range(n))
        return None

    def train_dataloader(self) -> DataLoader:
        """The stream in order; under several ranks batch b goes to rank b mod world (the last batches that cannot
        go to every rank are left out); resumable mid-stream (`--ckpt_path`)."""
        sampler = ShardedBatchSampler(len(self.items), self.hparams.batch_size, shuffle=False, **ranks(self.trainer))
        collate = functools.partial(collate_stream, pad_token_id=self.tokenizer.pad_token_id)
        return train_loader(self.items, sampler, collate, self.trainer)
