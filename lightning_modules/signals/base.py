"""One interface for every label-free signal (SPEC §1–4, §6–7).

A `Signal` maps `Candidates` (G answers to each of P questions, `lightning_modules/candidates.py`: what every
pipeline samples) to one float per candidate. The same object is a selection
filter's input (`datamodules/selection.py`), an RL reward (`lightning_modules/rl.py`) and an evaluation vote
weight or best-of-k pick (`callbacks/task_evaluation.py`, `callbacks/signal_quality.py`).

Design decisions:
- Which model judges is the signal's `judge`, applied in one place (`Signal.__call__`): "current" runs the policy
  as it is, "initial" the frozen initial model (`policy.reference()`: the adapter disabled), "none" reads only the
  candidates. Every call runs in `policy.inference()` (eval mode, no gradient).
- NaN means "no value". A signal that may legitimately have none (a vote with fewer than two parsed answers)
  says so with `abstains = True`; any other NaN, or a wrong length, is an error naming the signal (`score`).
- Costly signals are computed on the candidates still in play only (`score(..., where=keep)`); signals that read
  the rest of the group (`needs_group`, the votes) always see whole groups.
- A signal that needs labeled data (the DS weight's valid set) states it (`labeled`); the owner of the questions
  loads it disjoint from them and hands it over (`use_labeled`) before any generation; `check()` runs then too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_modules.candidates import Candidates, candidate_tensors
from lightning_modules.losses.functional import IGNORE_INDEX, predicting_labels
from lightning_modules.progress import phase


class Signal(nn.Module):
    """A label-free signal: `forward(candidates, policy) -> (N,)` float tensor, NaN = no value.

    Class attributes a signal sets: `higher_is_better`, `judge` ("current", "initial" or "none"), `needs_group`
    (reads the other candidates of its question), `abstains` (may return NaN), `deterministic` (one value per
    question and answer: `score` then scores each distinct answer of a question once), `labeled` (the labeled
    questions it needs, as `(split, count)`, or None)."""

    higher_is_better: bool = True
    judge: Literal["current", "initial", "none"] = "current"
    needs_group: bool = False
    abstains: bool = False
    deterministic: bool = True  # the value is a function of the question and the answer (a sampling judge: False)

    @property
    def name(self) -> str:
        """snake_case of the class name: the key of its column, metric and plot."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(self).__name__).lower()

    @property
    def labeled(self) -> tuple[str, int] | None:
        return None

    def use_labeled(self, questions: list[Any], task: Any) -> None:
        """Receives the labeled questions asked for in `labeled` (loaded disjoint from the questions it scores)."""

    def check(self) -> None:
        """Raises, naming the setting to give, when the signal cannot run; called before any generation."""

    def forward(self, candidates: Candidates, policy) -> Tensor:
        raise NotImplementedError

    def __call__(self, candidates: Candidates, policy) -> Tensor:
        if self.judge == "none":  # reads the candidates only: no model, no mode to set
            with torch.no_grad():
                return super().__call__(candidates, policy)
        judge = policy.reference() if self.judge == "initial" else contextlib.nullcontext()
        with policy.inference(), judge:
            return super().__call__(candidates, policy)


def score(signal: Signal, candidates: Candidates, policy, where: Tensor | None = None) -> Tensor:
    """`signal` on the candidates where `where` (N,) bool is set (all when None, and always all for a signal that
    `needs_group`), checked: one finite value per candidate asked for (NaN only from a signal that abstains).
    A `deterministic` signal that reads one candidate at a time scores each distinct answer of a question once (the
    samples of a question repeat each other: at T 0.5 the demo's 512 are 216 distinct) and its value is copied to
    the repeats. (N,) float32 on the CPU, NaN for the candidates not asked for."""
    n = len(candidates)
    index = torch.arange(n) if where is None or signal.needs_group else torch.nonzero(where.cpu()).flatten()
    out = torch.full((n,), float("nan"))
    if len(index) == 0:
        return out
    asked = candidates if len(index) == n else candidates.subset(index.tolist())
    first, inverse = distinct(asked) if signal.deterministic and not signal.needs_group else (None, None)
    if first is not None and len(first) < len(asked):
        asked = asked.subset(first)
    with phase(f"signal {signal.name}"):
        values = signal(asked, policy)
    if not isinstance(values, Tensor) or values.shape != (len(asked),):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"signal {signal.name} returned {shape} for {len(asked)} candidates: one value each expected")
    values = values.detach().float().cpu()
    if inverse is not None and len(first) < len(inverse):
        values = values[inverse]
    bad = torch.isinf(values) | (torch.isnan(values) & (not signal.abstains))
    if bad.any():
        raise ValueError(f"signal {signal.name} returned {int(bad.sum())} non-finite values (first at candidate "
                         f"{int(index[bad.nonzero()[0]])}) for candidates it was asked to score")
    return out.index_put_((index,), values)


def distinct(candidates: Candidates) -> tuple[list[int], Tensor]:
    """The first candidate of each distinct (question, response tokens, text, answer), and for every candidate the
    position of its distinct one in that list. (D,) indices, (N,) long."""
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    rows = zip(candidates.group.tolist(), candidates.response_ids, candidates.texts, candidates.answers)
    for i, (g, ids, text, answer) in enumerate(rows):
        key = (g, tuple(ids), text, answer)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    return first, torch.tensor(inverse, dtype=torch.long)


def signal_names(signals: Sequence[Signal]) -> list[str]:
    """Each signal's name, made unique by a suffix (`_2`, ...) where two share one."""
    names, seen = [], {}
    for s in signals:
        seen[s.name] = seen.get(s.name, 0) + 1
        names.append(s.name if seen[s.name] == 1 else f"{s.name}_{seen[s.name]}")
    return names


# ---------------------------------------------------------------------------------------------- teacher forcing
def response_values(candidates: Candidates, policy, fn: Callable[[Tensor], Tensor] | None,
                    batch_size: int = 16) -> list[Tensor]:
    """`fn(logits (n, V)) -> (n,)` (or `(n, m)`) of the distribution that produced each response token (None: the
    token's NLL), under the model as it is now (the caller picks it), batched by length: one float32 tensor (T,)
    (or (T, m)) per candidate, in response order."""
    device = next(policy.parameters()).device
    order = sorted(range(len(candidates)), key=lambda i: len(candidates.response_ids[i]))
    out: list[Tensor] = [torch.empty(0)] * len(candidates)
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if candidates.response_ids[i]]
        if not idx:
            continue
        part = candidates.subset(idx)
        ids, mask, labels = candidate_tensors(part, policy.tokenizer.pad_token_id, device)
        if fn is None:
            at = labels != IGNORE_INDEX  # (B, T) token_nll aligns each NLL with its label
            values = policy.token_nll(ids, mask, labels, candidates.prefix_ids)
        else:
            at = predicting_labels(labels)  # (B, T) the positions whose distribution produced a response token
            values = policy.token_map(ids, mask, at, fn, candidates.prefix_ids)
        values, at = values.float().cpu(), at.cpu()
        for row, i in enumerate(idx):
            out[i] = values[row][at[row]]
    return out
