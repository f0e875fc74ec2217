"""Selectors: label-free signals -> which candidates to keep and how much each weighs (SPEC §1–4).

A selector takes a signal object (`lightning_modules/signals/`) and is called with that signal's values (one
per candidate, NaN where it was not computed) and the current keep mask and weights; it returns new ones.
Selectors compose in a list, each seeing what the previous ones kept. Percentiles are taken over every candidate
still in play on **all ranks** (the values are all-gathered first), never per batch or
per rank. A selector that would keep nothing on any rank raises `EmptySelectionError` naming itself and the
signal's range, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.distributed import gather_all, global_percentile, global_sum, kept_anywhere
from lightning_modules.signals import (
    AnswerEntropy,
    DSWeight,
    MajorityAnswer,
    RewardModelScore,
    SelfRating,
    Signal,
    TokenNLL,
    VoteShare,
    score,
)


class EmptySelectionError(ValueError):
    pass


ALWAYS = (MajorityAnswer(), VoteShare(), AnswerEntropy(), TokenNLL())  # cheap: from the answers and stored log-probs


@dataclass
class Selection:
    """What the selectors decided over a round's candidates: `keep` (N,) bool, `weight` (N,), every signal's values
    by name (`ALWAYS`'s and the selectors'; a labeled set's as `labeled_<name>`, any length), and the `audit`
    after each stage ("all candidates", then each selector): kept, precision and recall over every rank's
    candidates, against gold read for the audit only."""

    keep: Tensor
    weight: Tensor
    signals: dict[str, Tensor]
    audit: list[dict]


def audit(keep: Tensor, correct: Tensor) -> dict:
    """Kept count, precision and recall over every rank's candidates."""
    kept, kept_correct, right = (global_sum(int(x.sum())) for x in (keep, keep & correct, correct))
    return {"kept": kept, "precision": kept_correct / max(kept, 1), "recall": kept_correct / max(right, 1)}


def select(candidates: Candidates, policy, selectors: Sequence[Selector], correct: Tensor,
           labeled: Callable[[], Candidates] | None = None) -> Selection:
    """The selectors in order over the candidates (this rank's), each seeing what the previous ones kept. A signal
    is scored only for the candidates still in play and once per candidate, however many selectors read it (a
    costly judge runs on what is left); `labeled()` gives the labeled set's gold answers as candidates for the
    roles a selector compares with labeled data. A selector's non-finite weight on a kept candidate is an error."""
    signals = {s.name: score(s, candidates, policy) for s in ALWAYS}
    n = len(candidates)
    keep, weight = torch.ones(n, dtype=torch.bool), torch.ones(n)
    stages = [{"name": "all candidates", **audit(keep, correct)}]
    computed = {id(s): signals[s.name] for s in ALWAYS}  # signal -> values, and where they were asked for
    asked = {id(s): torch.ones(n, dtype=torch.bool) for s in ALWAYS}
    for selector in selectors:
        values = {}
        for role, signal in selector.signals().items():
            key = id(signal)
            missing = keep & ~asked.get(key, torch.zeros_like(keep))  # costly signals: the candidates in play
            if key not in computed or missing.any():
                new = score(signal, candidates, policy, where=missing)
                computed[key] = torch.where(missing, new, computed[key]) if key in computed else new
                asked[key] = asked.get(key, torch.zeros_like(keep)) | missing
            values[role] = signals[signal.name] = computed[key]
            if role in selector.labeled_roles:
                values[f"labeled_{role}"] = signals[f"labeled_{signal.name}"] = score(signal, labeled(), policy)
        keep, weight = selector(values, keep, weight, candidates.group)
        if not torch.isfinite(weight[keep]).all():
            raise ValueError(f"{type(selector).__name__} gave non-finite weights to "
                             f"{int((~torch.isfinite(weight[keep])).sum())} kept candidates")
        stages.append({"name": type(selector).__name__, **audit(keep, correct)})
    return Selection(keep, weight, signals, stages)


class Selector:
    """Base class: `select(values, keep, weight, group) -> (keep, weight)`; keep (N,) bool, weight (N,) float,
    `values` maps each role of `signals()` to its (N,) values (NaN: not computed, or no value), and, for the roles
    in `labeled_roles`, `labeled_<role>` to the same signal on the labeled set's gold answers (any length)."""

    signal: Signal | None = None
    labeled_roles: frozenset[str] = frozenset()

    def signals(self) -> dict[str, Signal]:
        """The signals this selector reads, by role (the data module computes only these, on the candidates still
        in play)."""
        return {"value": self.signal} if self.signal is not None else {}

    def select(self, values: dict[str, Tensor], keep: Tensor, weight: Tensor, group: Tensor):
        raise NotImplementedError

    def __call__(self, values: dict[str, Tensor], keep: Tensor | None = None, weight: Tensor | None = None,
                 group: Tensor | None = None):
        n = len(next(iter(values.values())))
        keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
        weight = torch.ones(n) if weight is None else weight
        group = torch.arange(n) if group is None else group
        new_keep, new_weight = self.select(values, keep, weight, group)
        if kept_anywhere(keep) and not kept_anywhere(new_keep):  # over all ranks: every rank raises or none
            value = values.get("value", torch.empty(0))[keep]
            value = value[torch.isfinite(value)]
            span = f"[{value.min().item():.4g}, {value.max().item():.4g}]" if value.numel() else "n/a"
            name = self.signal.name if self.signal is not None else "-"
            raise EmptySelectionError(f"{type(self).__name__} kept nothing: signal {name!r} ranges over {span}")
        return new_keep, new_weight


class ThresholdFilter(Selector):
    """Keep candidates whose value is at least `threshold` (at most, for a lower-is-better signal). A value that is
    NaN is never kept."""

    def __init__(self, signal: Signal, threshold: float) -> None:
        self.signal, self.threshold = signal, threshold

    def select(self, values, keep, weight, group):
        v = values["value"]
        passed = v >= self.threshold if self.signal.higher_is_better else v <= self.threshold
        return keep & passed, weight


class MajorityVote(ThresholdFilter):
    """LMSI (SPEC §1): keep every candidate whose answer is its question's majority answer (`MajorityAnswer` = 1;
    a question without a vote keeps nothing)."""

    def __init__(self, signal: Signal | None = None) -> None:
        super().__init__(signal if signal is not None else MajorityAnswer(), 1.0)


class PercentileFilter(Selector):
    """Keep the best `keep` fraction of the candidates still in play by `signal` (its `higher_is_better` says which
    end is best): values >= the `100 * (1 - keep)`-th percentile, or <= the `100 * keep`-th for a lower-is-better
    signal, over all ranks. Non-finite values are never kept. `per_question`: the fraction is kept within each
    question instead (DeepConf's "keep the top eta of traces per question"). `rule="reference"` (IWSI's official
    `filter_data.py`, lower-is-better only): the cut is the sorted value at index int(keep x n) over all ranks,
    and values strictly below it are kept (the counts differ from the interpolated percentile whenever
    keep x (n - 1) is whole)."""

    def __init__(self, signal: Signal, keep: float = 0.8, rule: Literal["percentile", "reference"] = "percentile",
                 per_question: bool = False) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"{type(self).__name__}: keep must be in (0, 1], got {keep}")
        if rule == "reference" and (signal.higher_is_better or per_question):
            raise ValueError(f"{type(self).__name__}: rule 'reference' is IWSI's global lower-is-better cut")
        self.signal, self.keep, self.rule, self.per_question = signal, keep, rule, per_question

    def _passed(self, values: Tensor, keep: Tensor, percentile=global_percentile) -> Tensor:
        if self.signal.higher_is_better:
            return values >= percentile(values[keep], 100 * (1 - self.keep))
        return values <= percentile(values[keep], 100 * self.keep)

    def select(self, values, keep, weight, group):
        values = values["value"].double()
        finite = torch.isfinite(values)
        if self.rule == "reference":
            pooled = gather_all(values[keep])
            pooled = pooled[torch.isfinite(pooled)].sort().values
            index = int(self.keep * len(pooled))
            passed = values < pooled[index] if index < len(pooled) else finite
        elif self.per_question:
            passed = torch.zeros_like(keep)
            for g in group.unique():
                rows = group == g
                passed[rows] = self._passed(values[rows], (keep & finite)[rows], _local_percentile)
        else:
            passed = self._passed(values, keep)
        return keep & passed & finite, weight


class DSWeightFilter(PercentileFilter):
    """IWSI (SPEC §2): keep samples whose DS weight is at most the k-th percentile (k = 80) over all samples.
    `signal`: the `DSWeight` with its valid set and token rule (default `DSWeight()`)."""

    def __init__(self, keep: float = 0.8, rule: Literal["percentile", "reference"] = "percentile",
                 signal: DSWeight | None = None) -> None:
        super().__init__(signal if signal is not None else DSWeight(), keep, rule)


class AnswerEntropyFilter(Selector):
    """Entropy-filter (MoT, SPEC §3): drop questions whose normalised answer entropy is above a threshold:
    the `100 * keep`-th percentile of the questions' entropies (each question counted once), or `threshold`."""

    def __init__(self, keep: float = 0.8, threshold: float | None = None, signal: Signal | None = None) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"AnswerEntropyFilter: keep must be in (0, 1], got {keep}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"AnswerEntropyFilter: threshold is a normalised entropy in [0, 1], got {threshold}")
        self.keep, self.threshold = keep, threshold
        self.signal = signal if signal is not None else AnswerEntropy()

    def select(self, values, keep, weight, group):
        values = values["value"].double()
        if self.threshold is not None:
            cut = self.threshold
        else:
            first = torch.ones(len(group), dtype=torch.bool)  # one value per question: its first candidate's
            first[1:] = group[1:] != group[:-1]
            cut = global_percentile(values[first], 100 * self.keep)
        return keep & (values <= cut), weight


class SelfRatingFilter(PercentileFilter):
    """Self-filter (SPEC §3): keep the top `keep` fraction by the model's own 0–10 rating (`SelfRating()`)."""

    def __init__(self, keep: float = 0.8, signal: Signal | None = None) -> None:
        super().__init__(signal if signal is not None else SelfRating(), keep)


class RewardModelFilter(PercentileFilter):
    """RM-filter (SPEC §3): keep the top `keep` fraction by an external reward model's score; `model` is a
    sequence-classification directory (`RewardModelScore(model)`)."""

    def __init__(self, model: str, keep: float = 0.8) -> None:
        super().__init__(RewardModelScore(model), keep)


class EntropyThreshold(Selector):
    """SemiEvol (SPEC §4): keep unlabeled samples with response entropy (`TokenNLL`: mean NLL of the response
    tokens) H <= tau, tau the `percentile`-th percentile of the same quantity on the `labeled` population (default,
    the seed's reading: the labeled set's gold rationales under the current model) or on the `unlabeled`
    candidates themselves (the paper's Eq. 7). `inconsistent` is the official code's reading
    (`resolve_inconsistencies`): tau over the samples of questions whose answers disagree (`VoteShare` < 1), those
    kept when H < tau (strict), the consistent ones always kept. `percentile` defaults to 50, and to the official
    code's 30 for `inconsistent`."""

    def __init__(self, percentile: float | None = None, population: str = "labeled") -> None:
        if population not in ("labeled", "unlabeled", "inconsistent"):
            raise ValueError(f"population must be 'labeled', 'unlabeled' or 'inconsistent', got {population!r}")
        percentile = (30 if population == "inconsistent" else 50) if percentile is None else percentile
        if not 0 <= percentile <= 100:
            raise ValueError(f"EntropyThreshold: percentile must be in [0, 100], got {percentile}")
        self.percentile, self.population = percentile, population
        self.signal = TokenNLL()
        self.labeled_roles = frozenset({"value"}) if population == "labeled" else frozenset()

    def signals(self) -> dict[str, Signal]:
        return {"value": self.signal} | ({"consistency": VoteShare()} if self.population == "inconsistent" else {})

    def select(self, values, keep, weight, group):
        h = values["value"].double()
        if self.population == "inconsistent":
            consistent = values["consistency"] == 1  # every parsed answer agrees (NaN: no vote, inconsistent)
            tau = global_percentile(h[keep & ~consistent], self.percentile)
            return keep & (consistent | (h < tau)), weight
        reference = values["labeled_value"] if self.population == "labeled" else h[keep]
        tau = global_percentile(reference.double(), self.percentile)
        return keep & (h <= tau), weight


class ImportanceWeights(Selector):
    """IWSI-w (SPEC §2): keep everything, weight = clamp(w', max=C) with w' = L_valid / L (`DSWeight(output=
    "ratio")`), or any signal's value clamped the same way."""

    def __init__(self, max_weight: float = 2.0, signal: Signal | None = None) -> None:
        if not max_weight > 0:
            raise ValueError(f"ImportanceWeights: max_weight must be > 0, got {max_weight}")
        self.max_weight = max_weight
        self.signal = signal if signal is not None else DSWeight(output="ratio")

    def select(self, values, keep, weight, group):
        return keep, weight * values["value"].clamp(max=self.max_weight)


def load_with_labeled(task, signals: Sequence[Signal], requests: list[tuple[str, int | None]],
                      labeled_first: bool = True) -> list[list]:
    """The questions of `requests` (split, count), and each signal's labeled set (`signal.labeled`) handed to it,
    all loaded together so that splits reading one source are carved disjoint (`Task.load_splits`; the signals'
    sets come first, or last with `labeled_first=False`, so that `requests` read as `task.load` reads them).
    Signals asking alike share one set."""
    wanted = [s for s in signals if s.labeled is not None]
    labeled = list(dict.fromkeys(s.labeled for s in wanted))
    loaded = task.load_splits(labeled + list(requests) if labeled_first else list(requests) + labeled)
    sets, asked = (loaded[: len(labeled)], loaded[len(labeled) :]) if labeled_first else \
        (loaded[len(requests) :], loaded[: len(requests)])
    for signal in wanted:
        signal.use_labeled(sets[labeled.index(signal.labeled)], task)
    return asked


def _local_percentile(values: Tensor, q: float) -> float:
    """The q-th percentile of this rank's finite values (a question's candidates are all on one rank)."""
    values = values[torch.isfinite(values)]
    return torch.quantile(values.double(), q / 100).item() if values.numel() else math.nan
