"""LabeledDataModule: (weighted) SFT batches from prompt/response files or a `datasets` name.

Row fields: `prompt` or `question` (required), `response` or `rationale` (required, non-empty),
`weight` (optional, a number >= 0 that is finite in float32, the dtype training uses; default 1; an empty cell
is the default). Bad rows raise `DataError` naming the file and line,
or, with `on_bad_row="skip"`, are left out, counted and logged (`data/skipped_rows`) — never dropped silently.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.collate import (
    LengthBucketSampler,
    SFTExample,
    TokenizedExample,
    collate,
    ranks,
    tokenize_example,
    train_loader,
)
from datamodules.io import DataError, Row, check_at_least, read_rows
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import format_prompt, load_tokenizer

log = logging.getLogger(__name__)


def _text_field(row: Row, names: Sequence[str]) -> str:
    for name in names:
        if name in row.data and row.data[name] is not None:
            value = row.data[name]
            if not isinstance(value, str):
                raise DataError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{row.where}: field {name!r} is empty")
            return value
    raise DataError(f"{row.where}: missing field {' or '.join(map(repr, names))}")


def parse_sft_row(row: Row) -> tuple[str, str, float]:
    """(prompt, response, weight) of a row, or `DataError` naming the row."""
    prompt = _text_field(row, ("prompt", "question"))
    response = _text_field(row, ("response", "rationale"))
    weight = row.data.get("weight", 1.0)
    if weight is None or (isinstance(weight, str) and not weight.strip()):  # an empty csv cell: the default
        weight = 1.0
    if isinstance(weight, str):
        try:
            weight = float(weight)  # csv cells arrive as text
        except ValueError:
            raise DataError(f"{row.where}: weight {weight!r} is not a number") from None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(f"{row.where}: weight must be a number, got {type(weight).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"{row.where}: weight must be finite and >= 0, got {weight}")
    if weight > FLOAT32_MAX:
        raise DataError(f"{row.where}: weight {weight} is infinite in float32, the dtype training uses "
                        f"(at most {FLOAT32_MAX:.3g})")
    return prompt, response, float(weight)


FLOAT32_MAX = torch.finfo(torch.float32).max


class TokenizedDataset(Dataset):
    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]


class LabeledDataModule(L.LightningDataModule):
    """Weighted SFT data from files or a `datasets` name.

    Args:
        train_file: a .jsonl/.json/.csv/.parquet path, or a `datasets` name (loaded with `split`).
        val_file: optional validation source; or set `val_fraction` to hold out part of `train_file`.
        tokenizer: model whose tokenizer and chat template format the samples (linked to the policy's model).
        system_prompt: optional system message of the chat template.
        max_length: longest sample in tokens; longer ones are truncated and counted (`data/truncated`).
        on_bad_row: `error` stops at the first bad row; `skip` leaves bad rows out and counts them.
        bucket_by_length: batch samples of similar length together to limit padding.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.0,
        tokenizer: str = DEFAULT_MODEL,
        system_prompt: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        bucket_by_length: bool = True,
        on_bad_row: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_at_least("LabeledDataModule", 1, batch_size=batch_size, max_length=max_length)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"LabeledDataModule: val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.stats: dict[str, int] = {}
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None

    def _load(self, source: str, split: str, stage: str) -> list[TokenizedExample]:
        hp = self.hparams
        skipped: list[str] | None = [] if hp.on_bad_row == "skip" else None
        rows = read_rows(source, split, skipped)
        examples = []
        for row in rows:
            try:
                prompt, response, weight = parse_sft_row(row)
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
                continue
            text = format_prompt(self.tokenizer, prompt, hp.system_prompt)
            example = SFTExample(text, response, weight, row.where, user_text=prompt)
            examples.append(tokenize_example(self.tokenizer, example, hp.max_length))
        n_skipped = len(skipped or [])
        if n_skipped:
            log.warning("%s: skipped %d bad rows, e.g. %s", source, n_skipped, "; ".join(skipped[:3]))
        if not examples:
            raise DataError(f"{source}: no usable rows ({n_skipped} skipped)")
        if all(e.weight == 0 for e in examples):
            raise DataError(f"{source}: every weight is 0, so nothing would train")
        truncated = sum(e.truncated for e in examples)
        if truncated:
            log.warning("%s: truncated %d of %d samples to max_length=%d",
                        source, truncated, len(examples), hp.max_length)
        self.stats[f"{stage}_rows"] = len(examples)
        self.stats[f"{stage}_skipped_rows"] = n_skipped
        self.stats[f"{stage}_truncated"] = truncated
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        train = self._load(hp.train_file, hp.split, "train")
        val: list[TokenizedExample] = []
        if hp.val_file:
            val = self._load(hp.val_file, hp.val_split, "val")
        elif hp.val_fraction > 0:
            g = torch.Generator().manual_seed(hp.seed)
            order = torch.randperm(len(train), generator=g).tolist()
            n_val = max(1, int(round(hp.val_fraction * len(train))))
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        self.train_set = TokenizedDataset(train)
        self.val_set = TokenizedDataset(val) if val else None
        log.info("data: %s", self.stats)
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:  # rows, skipped rows and truncated samples in TensorBoard too
            logger.log_metrics({f"data/{name}": float(value) for name, value in self.stats.items()}, step=0)

    def _loader(self, dataset: TokenizedDataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        collate_fn = functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        if hp.bucket_by_length:
            sampler = LengthBucketSampler([len(e.input_ids) for e in dataset.examples], hp.batch_size, shuffle=shuffle,
                                          seed=hp.seed, **ranks(self.trainer))
            return train_loader(dataset, sampler, collate_fn, self.trainer if shuffle else None, hp.num_workers)
        return DataLoader(dataset, hp.batch_size, shuffle=shuffle, collate_fn=collate_fn, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
