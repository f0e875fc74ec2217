"""Selectors: hand values, percentile semantics, empty selections, DDP-global percentiles."""

import math

import pytest
import torch

from datamodules.selection import (
    AnswerEntropyFilter,
    DSWeightFilter,
    EmptySelectionError,
    EntropyThreshold,
    ImportanceWeights,
    MajorityVote,
    PercentileFilter,
    SelfRatingFilter,
    ThresholdFilter,
)
from lightning_modules.distributed import global_percentile
from lightning_modules.losses.functional import ds_weight
from lightning_modules.signals import Signal


class Values(Signal):
    """A stand-in: the tests hand the selector its values directly."""

    def __init__(self, higher_is_better: bool = True) -> None:
        super().__init__()
        self.higher_is_better = higher_is_better


def v(values, **more):
    return {"value": torch.as_tensor(values, dtype=torch.float32), **more}


def test_majority_vote_selector():
    keep, weight = MajorityVote()(v([1.0, 0.0, 1.0, math.nan]))
    assert keep.tolist() == [True, False, True, False] and weight.tolist() == [1, 1, 1, 1]


def test_percentile_filter_keeps_the_fraction_asked():
    values = torch.arange(100, dtype=torch.float32)
    keep, _ = PercentileFilter(Values(higher_is_better=False), keep=0.8)(v(values))
    assert keep.sum() == 80 and keep[:80].all()  # the lowest 80 (<= the 80th percentile, 79.2)
    keep, _ = PercentileFilter(Values(), keep=0.8)(v(values))
    assert keep.sum() == 80 and keep[20:].all()
    keep, _ = SelfRatingFilter(keep=0.5)(v([0.0, 10, 5, 7]))
    assert keep.tolist() == [False, True, False, True]


def test_percentile_filter_per_question_keeps_the_fraction_of_each_question():
    values, group = torch.tensor([1.0, 2, 3, 4, 10, 20, 30, 40]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep, _ = PercentileFilter(Values(), keep=0.5, per_question=True)(v(values), group=group)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    naive = [x >= torch.quantile(values[group == g], 0.5).item() for x, g in zip(values.tolist(), group.tolist())]
    assert keep.tolist() == naive
    keep, _ = PercentileFilter(Values(), keep=0.5)(v(values), group=group)  # global: the top half overall
    assert keep.tolist() == [False] * 4 + [True] * 4


def test_ds_weight_filter_on_hand_losses():
    # valid mean loss 1.0; losses -> DS weights 1, 2, 4, 1.25, no value (L = 0, as DSWeight marks it)
    weights = ds_weight(torch.tensor([1.0, 0.5, 4.0, 0.8, 0.0]), 1.0).masked_fill(torch.arange(5) == 4, math.nan)
    torch.testing.assert_close(weights[:4], torch.tensor([1.0, 2.0, 4.0, 1.25]))
    keep, weight = DSWeightFilter(keep=0.5)(v(weights))
    # the 50th percentile of the weights (1, 1.25, 2, 4) is 1.625: keep 1 and 1.25; no value never
    assert keep.tolist() == [True, False, False, True, False] and torch.equal(weight, torch.ones(5))
    keep, weight = ImportanceWeights(max_weight=2.0)(v([1.0, 2.0, 0.25, 1.25, 3.0]))
    assert keep.all()
    torch.testing.assert_close(weight, torch.tensor([1.0, 2.0, 0.25, 1.25, 2.0]))


def test_answer_entropy_filter_counts_each_question_once():
    values, group = v([0.0, 0.0, 0.0, 0.9, 0.9, 0.5]), torch.tensor([0, 0, 0, 1, 1, 2])
    keep, _ = AnswerEntropyFilter(keep=0.5)(values, group=group)  # question entropies 0, 0.9, 0.5 -> median 0.5
    assert keep.tolist() == [True, True, True, False, False, True]
    keep, _ = AnswerEntropyFilter(threshold=0.1)(values, group=group)
    assert keep.tolist() == [True, True, True, False, False, False]


def test_semievol_threshold_from_the_labeled_population():
    values = v([0.1, 0.5, 0.9, 2.0], labeled_value=torch.tensor([0.2, 0.4, 0.6, math.nan]))
    keep, _ = EntropyThreshold(percentile=50)(values)  # tau = median(0.2, 0.4, 0.6) = 0.4
    assert keep.tolist() == [True, False, False, False]
    keep, _ = EntropyThreshold(percentile=50, population="unlabeled")(values)  # tau = 0.7
    assert keep.tolist() == [True, True, False, False]
    assert EntropyThreshold().labeled_roles == {"value"} and not EntropyThreshold(population="unlabeled").labeled_roles


def test_selectors_compose_and_empty_selection_names_the_selector():
    keep, _ = MajorityVote()(v([1.0, 1, 0, 1]))
    keep, _ = PercentileFilter(Values(), keep=0.5)(v([3.0, 1, 0, 2]), keep)
    assert keep.tolist() == [True, False, False, True]  # the percentile is over the 3 majority rows only (2.0)
    with pytest.raises(EmptySelectionError, match=r"MajorityVote kept nothing: signal 'majority_answer'"):
        MajorityVote()(v(torch.zeros(3)))
    with pytest.raises(EmptySelectionError, match=r"ranges over \[0.5, 0.5\]"):
        EntropyThreshold(percentile=50)(v([0.5], labeled_value=torch.tensor([0.1])))
    keep, _ = ThresholdFilter(Values(higher_is_better=False), 0.5)(v([0.2, 0.5, 0.7, math.nan]))
    assert keep.tolist() == [True, True, False, False]


def _percentile_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    values = torch.arange(100, dtype=torch.float32)[rank::world]  # each rank holds half
    keep, _ = PercentileFilter(Values(higher_is_better=False), keep=0.8)(v(values))
    torch.save({"cut": global_percentile(values, 80), "kept": values[keep].tolist()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_percentiles_are_global_across_ranks(tmp_path, spawn_ranks):
    spawn_ranks(_percentile_worker, str(tmp_path))
    single = torch.arange(100, dtype=torch.float32)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["cut"] == results[1]["cut"] == global_percentile(single, 80)
    assert sorted(results[0]["kept"] + results[1]["kept"]) == list(range(80))  # same 80 as one process


def test_iwsi_reference_cut_keeps_strictly_below_the_sorted_value():
    weights = torch.arange(1.0, 12.0)  # 11 values: 0.8 x (11 - 1) = 8 is whole
    keep, _ = DSWeightFilter(keep=0.8)(v(weights))
    assert int(keep.sum()) == 9  # the interpolated percentile is 9.0, kept: <= 9
    keep, _ = DSWeightFilter(keep=0.8, rule="reference")(v(weights))
    assert keep.tolist() == [True] * 8 + [False] * 3  # sorted[int(0.8 x 11) = 8] = 9, kept: < 9
    naive = [w < sorted(weights.tolist())[int(0.8 * 11)] for w in weights.tolist()]
    assert keep.tolist() == naive
    with pytest.raises(ValueError, match="lower-is-better"):
        PercentileFilter(Values(), rule="reference")


def test_semievol_inconsistent_population_hand_values():
    # questions a (consistent: share 1) and b, c (answers disagree)
    values = v([9.0, 9.0, 1.0, 2.0, 3.0, 4.0], consistency=torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.5]))
    assert EntropyThreshold(population="inconsistent").percentile == 30 and EntropyThreshold().percentile == 50
    keep, _ = EntropyThreshold(population="inconsistent")(values)
    # tau = 30th percentile of [1, 2, 3, 4] = 1.9 (linear); inconsistent kept when H < tau; consistent always
    assert keep.tolist() == [True, True, True, False, False, False]
