"""Selectors: label-free signals -> which candidates to keep and how much each weighs (SPEC §1–4).

A selector is a small class called with a `Signals` table (one row per candidate, columns of equal length)
and the current keep mask and weights; it returns new ones. Selectors compose in a list, each seeing what the
previous ones kept. Percentiles are taken over every candidate still in play on **all ranks** (the values are
all-gathered first), never per batch or per rank. A selector that would keep nothing on any rank raises
`EmptySelectionError` naming itself and the signal's range, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from datamodules.generation import gather_objects
from lightning_modules.losses.functional import ds_weight

Signals = dict[str, Tensor]  # column name -> (N,) tensor, one row per candidate


class EmptySelectionError(ValueError):
    pass


def gather_all(values: Tensor) -> Tensor:
    """All ranks' values concatenated in rank order (the values themselves when not distributed)."""
    parts = gather_objects(values.cpu())
    return values if len(parts) == 1 else torch.cat(parts).to(values.device)


def kept_anywhere(keep: Tensor) -> bool:
    """Whether any rank keeps a candidate (every rank must call it alike)."""
    return sum(gather_objects(int(keep.sum()))) > 0


def global_percentile(values: Tensor, q: float) -> float:
    """The q-th percentile (0..100, linear interpolation, like numpy's default) over all ranks' finite values."""
    pooled = gather_all(values.double())
    pooled = pooled[torch.isfinite(pooled)]
    if pooled.numel() == 0:
        return math.nan
    return torch.quantile(pooled, q / 100).item()


class Selector:
    """Base class: `select(signals, keep, weight) -> (keep, weight)`; keep (N,) bool, weight (N,) float."""

    signal = ""

    @property
    def needs(self) -> set[str]:
        """The signal columns this selector reads (the data module computes only what is needed)."""
        return {self.signal}

    def select(self, signals: Signals, keep: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, signals: Signals, keep: Tensor | None = None, weight: Tensor | None = None):
        n = len(next(iter(signals.values())))
        keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
        weight = torch.ones(n) if weight is None else weight
        new_keep, new_weight = self.select(signals, keep, weight)
        if kept_anywhere(keep) and not kept_anywhere(new_keep):  # over all ranks: every rank raises or none
            values = signals.get(self.signal, torch.empty(0))[keep] if self.signal else torch.empty(0)
            span = f"[{values.min().item():.4g}, {values.max().item():.4g}]" if values.numel() else "n/a"
            raise EmptySelectionError(f"{type(self).__name__} kept nothing: signal {self.signal!r} ranges over {span}")
        return new_keep, new_weight


class MajorityVote(Selector):
    """LMSI (SPEC §1): keep every candidate whose answer is its question's majority answer."""

    signal = "is_majority"

    def select(self, signals, keep, weight):
        return keep & (signals["is_majority"] == 1), weight  # NaN (fewer than 2 parsed answers) is no majority


class PercentileFilter(Selector):
    """Keep the best `keep` fraction of the candidates still in play by `signal`.

    `lower_is_better`: keep values <= the `100 * keep`-th percentile; else values >= the `100 * (1 - keep)`-th.
    Non-finite values are never kept. `rule="reference"` (IWSI's official `filter_data.py`, lower-is-better only):
    the cut is the sorted value at index int(keep x n) over all ranks, and values strictly below it are kept
    (the counts differ from the interpolated percentile whenever keep x (n - 1) is whole)."""

    def __init__(self, signal: str, keep: float = 0.8, lower_is_better: bool = True,
                 rule: Literal["percentile", "reference"] = "percentile") -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"{type(self).__name__}: keep must be in (0, 1], got {keep}")
        if rule == "reference" and not lower_is_better:
            raise ValueError(f"{type(self).__name__}: rule 'reference' is IWSI's lower-is-better cut")
        self.signal, self.keep, self.lower_is_better, self.rule = signal, keep, lower_is_better, rule

    def select(self, signals, keep, weight):
        values = signals[self.signal].double()
        if self.rule == "reference":
            pooled = gather_all(values[keep])
            pooled = pooled[torch.isfinite(pooled)].sort().values
            index = int(self.keep * len(pooled))
            passed = values < pooled[index] if index < len(pooled) else torch.isfinite(values)
            return keep & passed & torch.isfinite(values), weight
        if self.lower_is_better:
            cut = global_percentile(values[keep], 100 * self.keep)
            passed = values <= cut
        else:
            cut = global_percentile(values[keep], 100 * (1 - self.keep))
            passed = values >= cut
        return keep & passed & torch.isfinite(values), weight


class DSWeightFilter(PercentileFilter):
    """IWSI (SPEC §2): keep samples whose DS weight is at most the k-th percentile (k = 80) over all samples."""

    def __init__(self, keep: float = 0.8, rule: Literal["percentile", "reference"] = "percentile") -> None:
        super().__init__("ds_weight", keep, lower_is_better=True, rule=rule)


class AnswerEntropyFilter(Selector):
    """Entropy-filter (MoT, SPEC §3): drop questions whose normalised answer entropy is above a threshold:
    the `100 * keep`-th percentile of the questions' entropies (each question counted once), or `threshold`."""

    signal = "answer_entropy"
    needs = {"answer_entropy", "first_of_question"}

    def __init__(self, keep: float = 0.8, threshold: float | None = None) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"AnswerEntropyFilter: keep must be in (0, 1], got {keep}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"AnswerEntropyFilter: threshold is a normalised entropy in [0, 1], got {threshold}")
        self.keep, self.threshold = keep, threshold

    def select(self, signals, keep, weight):
        values = signals["answer_entropy"].double()
        if self.threshold is not None:
            cut = self.threshold
        else:
            first = signals["first_of_question"].bool()  # one value per question
            cut = global_percentile(values[first], 100 * self.keep)
        return keep & (values <= cut), weight


class SelfRatingFilter(PercentileFilter):
    """Self-filter (SPEC §3): keep the top `keep` fraction by the model's own 0–10 rating."""

    def __init__(self, keep: float = 0.8) -> None:
        super().__init__("self_rating", keep, lower_is_better=False)


class RewardModelFilter(PercentileFilter):
    """RM-filter (SPEC §3): keep the top `keep` fraction by an external reward model's score."""

    def __init__(self, keep: float = 0.8) -> None:
        super().__init__("reward_model_score", keep, lower_is_better=False)


class EntropyThreshold(Selector):
    """SemiEvol (SPEC §4): keep unlabeled samples with response entropy (mean NLL of the response tokens)
    H <= tau, tau the `percentile`-th percentile of the same quantity on the `labeled` population (default, the
    seed's reading; `labeled_token_entropy` holds the labeled values, any length) or on the `unlabeled`
    candidates themselves (the paper's Eq. 7). `inconsistent` is the official code's reading
    (`resolve_inconsistencies`): tau over the samples of questions whose answers disagree (vote share < 1), those
    kept when H < tau (strict), the consistent ones always kept. `percentile` defaults to 50, and to the official
    code's 30 for `inconsistent`."""

    signal = "token_entropy"

    def __init__(self, percentile: float | None = None, population: str = "labeled") -> None:
        if population not in ("labeled", "unlabeled", "inconsistent"):
            raise ValueError(f"population must be 'labeled', 'unlabeled' or 'inconsistent', got {population!r}")
        percentile = (30 if population == "inconsistent" else 50) if percentile is None else percentile
        if not 0 <= percentile <= 100:
            raise ValueError(f"EntropyThreshold: percentile must be in [0, 100], got {percentile}")
        self.percentile, self.population = percentile, population

    @property
    def needs(self) -> set[str]:
        extra = {"labeled": {"labeled_token_entropy"}, "inconsistent": {"vote_share"}}.get(self.population, set())
        return {"token_entropy"} | extra

    def select(self, signals, keep, weight):
        values = signals["token_entropy"].double()
        if self.population == "inconsistent":
            consistent = signals["vote_share"] == 1  # every parsed answer agrees (NaN: no vote, inconsistent)
            tau = global_percentile(values[keep & ~consistent], self.percentile)
            return keep & (consistent | (values < tau)), weight
        reference = signals["labeled_token_entropy"] if self.population == "labeled" else values[keep]
        tau = global_percentile(reference.double(), self.percentile)
        return keep & (values <= tau), weight


class ImportanceWeights(Selector):
    """IWSI-w (SPEC §2): keep everything, weight = clamp(w', max=C) with w' = L_valid / L."""

    signal = "ds_ratio"
    needs = {"ds_ratio"}

    def __init__(self, max_weight: float = 2.0) -> None:
        if not max_weight > 0:
            raise ValueError(f"ImportanceWeights: max_weight must be > 0, got {max_weight}")
        self.max_weight = max_weight

    def select(self, signals, keep, weight):
        return keep, weight * signals["ds_ratio"].clamp(max=self.max_weight)


def apply_selectors(selectors: Sequence[Selector], signals: Signals) -> tuple[Tensor, Tensor]:
    keep, weight = None, None
    for selector in selectors:
        keep, weight = selector(signals, keep, weight)
    if keep is None:
        n = len(next(iter(signals.values())))
        keep, weight = torch.ones(n, dtype=torch.bool), torch.ones(n)
    return keep, weight


def ds_signals(sample_loss: Tensor, valid_mean_loss: float, clip_like_reference: bool = False) -> Signals:
    """The IWSI columns from per-sample losses of the pre-trained model: `ds_weight` and `ds_ratio` (w')."""
    return {"ds_weight": ds_weight(sample_loss, valid_mean_loss, clip_like_reference),
            "ds_ratio": valid_mean_loss / sample_loss.float()}
