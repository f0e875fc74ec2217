"""IWSI's distribution-shift weight (arXiv 2408.09849; official code rubickkcibur/IWSI; SPEC §2).

L(x) = the per-sample mean NLL of the **pre-trained** model (judge: the initial model) in the training format: the
question as the user turn (chat template) followed by the answer and eos. `tokens="all"` (default, the official
code's reading) scores every real token of question + answer; `"completion"` the answer's tokens only.
The valid set (`valid_questions` labeled questions with gold rationales, from `valid_split`, loaded by the owner
of the questions disjoint from them) gives L_v = the mean of its per-sample losses, computed once (the judge is
frozen). w' = L_v / L; `output="weight"` (default): w_DS = max(w', 1/w') >= 1 (`clip_like_reference`: the
official clamps, see `functional.ds_weight`), lower is better; `output="ratio"`: w' itself (IWSI-w's weight).
A sample with L = 0 has no weight (NaN: never kept), as the official code drops it.
`first_token_from_pad` also scores the first token from a pad position, as the official `record_loss.py` does
under its left padding; it reproduces that code to 5e-7.
`cache_dir` keeps the candidates' losses on disk, keyed by what they depend on (the initial model's weights, the
scored texts and every scoring setting): runs that score the same candidates under the same model (a k sweep, the
reference clip, a re-run) score them once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_modules.batching import SFTExample, collate, tokenize_example, with_leading_pad
from lightning_modules.candidates import Candidates
from lightning_modules.losses.functional import IGNORE_INDEX, ds_weight
from lightning_modules.signals.base import Signal
from lightning_modules.storage import cache_key, read_verified, write_verified


def sample_losses(policy, examples: Sequence[SFTExample], tokens: Literal["all", "completion"] = "all",
                  batch_size: int = 16, max_length: int = 1024, first_token_from_pad: bool = False,
                  progress: bool = True) -> Tensor:
    """Per-sample mean NLL of `examples` in the training format under the model as it is now (the caller picks it:
    `policy.reference()` for the pre-trained one). (N,) float32, in the order given."""
    tokenized = [tokenize_example(policy.tokenizer, e, max_length) for e in examples]
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    out = torch.empty(len(tokenized))
    device = next(policy.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress):
        idx = order[start : start + batch_size]
        batch = collate([tokenized[i] for i in idx], policy.tokenizer.pad_token_id)
        if first_token_from_pad:
            batch = with_leading_pad(batch, policy.tokenizer.pad_token_id)
        if tokens == "all":  # every real token is a target (the first has no context unless a pad leads)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        batch = {k: v.to(device) for k, v in batch.items()}
        out[idx] = policy.sequence_nll(batch).float().cpu()
    return out


class DSWeight(Signal):
    judge, abstains = "initial", True

    def __init__(self, valid_questions: int = 3, valid_split: str = "valid",
                 tokens: Literal["all", "completion"] = "all", clip_like_reference: bool = False,
                 first_token_from_pad: bool = False, output: Literal["weight", "ratio"] = "weight",
                 batch_size: int = 16, max_length: int = 1024, cache_dir: str | None = None) -> None:
        super().__init__()
        if valid_questions < 1:
            raise ValueError(f"DSWeight needs a labeled valid set: valid_questions must be at least 1, "
                             f"got {valid_questions}")
        self.valid_questions, self.valid_split, self.tokens = valid_questions, valid_split, tokens
        self.clip_like_reference, self.first_token_from_pad = clip_like_reference, first_token_from_pad
        self.output = output
        self.batch_size, self.max_length, self.cache_dir = batch_size, max_length, cache_dir
        self.higher_is_better = output == "ratio"
        self.valid: list[tuple[str, str]] = []  # (question, gold rationale)
        self.valid_mean: float | None = None

    @property
    def name(self) -> str:
        return "ds_weight" if self.output == "weight" else "ds_ratio"

    @property
    def labeled(self) -> tuple[str, int]:
        return self.valid_split, self.valid_questions

    def use_labeled(self, questions: list[Any], task: Any) -> None:
        self.valid = [(task.format_question(q), task.format_rationale(q)) for q in questions]
        self.valid_mean = None

    def check(self) -> None:
        if not self.valid:
            raise ValueError(f"DSWeight has no valid set: give DSWeight.valid_questions labeled questions with "
                             f"rationales in split {self.valid_split!r} (DSWeight.valid_split)")

    def losses(self, pairs: Sequence[tuple[str, str]], policy) -> Tensor:
        """Per-pair losses under the initial model (the caller's judge), read from `cache_dir` when it holds them."""
        examples = [SFTExample(policy.format_prompt(q), a) for q, a in pairs]
        path = self._cached(examples, policy)
        data = read_verified(path) if path is not None else None  # checked against its content hash
        if data is not None:
            return torch.load(io.BytesIO(data), weights_only=True)  # a tensor: never unpickle objects
        out = sample_losses(policy, examples, self.tokens, self.batch_size, self.max_length, self.first_token_from_pad)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save(out, buffer)
            write_verified(path, buffer.getvalue())
        return out

    def _cached(self, examples: Sequence[SFTExample], policy) -> Path | None:
        """Where `cache_dir` keeps these losses: keyed by the initial model's weights, the texts and every setting
        that changes a loss (the batch size too: it changes the padding, so the last bits)."""
        if self.cache_dir is None:
            return None
        payload = {"model": policy.fingerprint(initial=True), "tokens": self.tokens, "max_length": self.max_length,
                   "first_token_from_pad": self.first_token_from_pad, "batch_size": self.batch_size,
                   "examples": [(e.prompt, e.response) for e in examples]}
        return Path(self.cache_dir) / f"ds_losses-{cache_key(payload)}.pt"

    def forward(self, candidates: Candidates, policy) -> Tensor:
        self.check()
        if self.valid_mean is None:
            self.valid_mean = self.losses(self.valid, policy).mean().item()
        loss = self.losses([(candidates.question_text(i), t) for i, t in enumerate(candidates.texts)], policy)
        value = self.valid_mean / loss if self.output == "ratio" else ds_weight(loss, self.valid_mean,
                                                                                self.clip_like_reference)
        return value.masked_fill(loss == 0, float("nan"))
