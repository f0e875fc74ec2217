"""Signals from the model's own token distributions on each response (SPEC §4, §7). The response is scored after
the prompt that sampled it (`Candidates.prompt_ids`, shared prefix included), by the current model.

- `TokenNLL` (SemiEvol's response entropy, SPEC §4): -(1/T) sum_t log p(y_t | ...), lower is better. Read from the
  log-probs stored at sampling (temperature 1, the model that sampled) when the candidates carry them, else one
  teacher-forced pass (a labeled set's gold rationales).
- `SelfCertainty` (Intuitor, arXiv 2505.19590): mean_t KL(U || p_t) = mean_t [-log|V| - (1/|V|) sum_v log p_t(v)].
- `NegativeEntropy`: minus the token entropy H(p_t) of the response, `reduction="mean"` (RENT, arXiv
  2505.22660: -(1/T) sum_t H(p_t), the default) or `"sum"` (EM-RL, arXiv 2505.15134); `last_k` keeps only the
  response's last k tokens (an option of ours: RENT's code has none); `unparsable_value` is the value of an
  unparsable answer: RENT's fixed penalty -7.0 (`entropy_base` with its `format` experiment, satrams/rent-rl),
  `"lowest"` for -log|V| (the lowest mean the signal can take), None to keep its entropy.
- `DeepConf` (arXiv 2508.15260; facebookresearch/deepconf `utils.py`): token confidence C_t = -(1/k) sum_{j<=k}
  log p_t(j) over the top-k tokens (k = 20; `include_sampled: true` adds the sampled token when it is not among
  them, as the official vLLM path's 21 values do; the default keeps exactly k, a deviation); group confidence =
  the mean of C over a sliding window of `window` tokens (the paper's 2048; a trace shorter than the window is one
  group); trace score = the lowest group confidence (`reduce="lowest"`), the mean of the lowest `bottom_percent`
  of the group confidences (`"bottom"`, at least one: the official `bottom_window`, 10%), the mean of the last
  `window` tokens (`"tail"`) or the mean over the trace (`"mean"`). An empty response scores 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.losses.functional import entropy
from lightning_modules.signals.base import Signal, response_values


def _mean(values: list[Tensor], empty: float = 0.0) -> Tensor:
    return torch.tensor([v.mean().item() if len(v) else empty for v in values])


class TokenNLL(Signal):
    higher_is_better = False

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def forward(self, candidates: Candidates, policy) -> Tensor:
        if candidates.logprobs is not None:
            return torch.tensor([-sum(lp) / len(lp) if len(lp) else 0.0 for lp in candidates.logprobs])
        return _mean(response_values(candidates, policy, None, self.batch_size))


class SelfCertainty(Signal):
    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def forward(self, candidates: Candidates, policy) -> Tensor:
        return _mean(response_values(candidates, policy, kl_from_uniform, self.batch_size))


def kl_from_uniform(logits: Tensor) -> Tensor:
    """KL(U || softmax(logits)) over the last dimension, float32. (..., V) -> (...)."""
    log_p = logits.float().log_softmax(-1)
    return -log_p.mean(-1) - math.log(logits.shape[-1])


class NegativeEntropy(Signal):
    def __init__(self, reduction: Literal["mean", "sum"] = "mean", last_k: int | None = None,
                 unparsable_value: float | None | Literal["lowest"] = -7.0, batch_size: int = 16) -> None:
        super().__init__()
        if last_k is not None and last_k < 1:
            raise ValueError(f"NegativeEntropy: last_k must be at least 1, got {last_k}")
        self.reduction, self.last_k, self.unparsable_value = reduction, last_k, unparsable_value
        self.batch_size = batch_size

    def forward(self, candidates: Candidates, policy) -> Tensor:
        values = response_values(candidates, policy, entropy, self.batch_size)
        if self.last_k is not None:
            values = [v[-self.last_k :] for v in values]
        out = -(_mean(values) if self.reduction == "mean" else torch.tensor([v.sum().item() for v in values]))
        if self.unparsable_value is not None:
            low = -math.log(len(policy.tokenizer)) if self.unparsable_value == "lowest" else self.unparsable_value
            unparsable = torch.tensor([a is None for a in candidates.answers])
            out[unparsable] = low
        return out


class DeepConf(Signal):
    def __init__(self, top_k: int = 20, window: int = 2048,
                 reduce: Literal["lowest", "bottom", "tail", "mean"] = "lowest", bottom_percent: float = 0.1,
                 include_sampled: bool = False, batch_size: int = 16) -> None:
        super().__init__()
        if top_k < 1 or window < 1:
            raise ValueError(f"DeepConf: top_k and window must be at least 1, got {top_k} and {window}")
        if not 0 < bottom_percent <= 1:
            raise ValueError(f"DeepConf: bottom_percent must be in (0, 1], got {bottom_percent}")
        self.top_k, self.window, self.reduce, self.bottom_percent = top_k, window, reduce, bottom_percent
        self.include_sampled, self.batch_size = include_sampled, batch_size

    def top_logprobs(self, logits: Tensor) -> Tensor:
        """The k largest log-probs, descending. (n, V) -> (n, k)."""
        return logits.float().log_softmax(-1).topk(self.top_k, dim=-1).values

    def token_confidence(self, top: Tensor, sampled: Tensor | None = None) -> Tensor:
        """C_t from the top-k log-probs (T, k), with the sampled token's log-prob (T,) when it falls below them
        (`include_sampled`). (T,)."""
        if sampled is None:
            return -top.mean(-1)
        outside = sampled < top[:, -1]
        return torch.where(outside, -(top.sum(-1) + sampled) / (self.top_k + 1), -top.mean(-1))

    def trace_score(self, confidence: Tensor) -> float:
        """One trace's score from its token confidences (T,)."""
        if len(confidence) == 0:
            return 0.0
        if self.reduce == "tail":
            return confidence[-self.window :].mean().item()
        if self.reduce == "mean" or len(confidence) <= self.window:
            return confidence.mean().item()
        windows = confidence.unfold(0, self.window, 1).mean(-1)  # (T - w + 1,) group confidences
        if self.reduce == "bottom":
            return windows.sort().values[: max(1, int(len(windows) * self.bottom_percent))].mean().item()
        return windows.min().item()

    def forward(self, candidates: Candidates, policy) -> Tensor:
        tops = response_values(candidates, policy, self.top_logprobs, self.batch_size)
        sampled = [None] * len(candidates)
        if self.include_sampled:  # the sampled tokens' log-probs: stored at sampling (as TokenNLL reads), else a pass
            sampled = ([torch.tensor(lp) for lp in candidates.logprobs] if candidates.logprobs is not None else
                       [-nll for nll in response_values(candidates, policy, None, self.batch_size)])
        return torch.tensor([self.trace_score(self.token_confidence(t, s) if len(t) else t)
                             for t, s in zip(tops, sampled)])
