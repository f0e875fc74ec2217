"""Signals and selectors: hand values, percentile semantics, empty selections, DDP-global percentiles."""

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
    apply_selectors,
    ds_signals,
    global_percentile,
)
from datamodules.signals import token_entropy, vote_signals
from datamodules.tasks import Arithmetic


def test_vote_signals_hand_values():
    ids = ["q1"] * 4 + ["q2"] * 3
    answers = ["84", "84.0", "85", None, None, None, "7"]
    signals, majority = vote_signals(ids, answers, Arithmetic())
    assert majority == ["84"] * 4 + ["7"] * 3
    assert signals["is_majority"][:4].tolist() == [1, 1, 0, 0] and signals["is_majority"][4:].isnan().all()
    assert signals["vote_share"][:4].tolist() == pytest.approx([2 / 3] * 4)
    assert signals["n_parsed"].tolist() == [3, 3, 3, 3, 1, 1, 1]
    want = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    assert signals["answer_entropy"][0].item() == pytest.approx(want)
    assert signals["answer_entropy"][4:].isnan().all()  # one parsed answer: no vote, not "certain"
    assert signals["first_of_question"].tolist() == [1, 0, 0, 0, 1, 0, 0]


def test_token_entropy_is_mean_nll():
    got = token_entropy([[-1.0, -3.0], [-0.5], []])
    assert got[:2].tolist() == [2.0, 0.5] and math.isnan(got[2])


def test_majority_vote_selector():
    keep, weight = MajorityVote()({"is_majority": torch.tensor([1.0, 0.0, 1.0])})
    assert keep.tolist() == [True, False, True] and weight.tolist() == [1, 1, 1]


def test_percentile_filter_keeps_the_fraction_asked():
    values = torch.arange(100, dtype=torch.float32)
    keep, _ = PercentileFilter("x", keep=0.8)({"x": values})
    assert keep.sum() == 80 and keep[:80].all()  # the lowest 80 (<= the 80th percentile, 79.2)
    keep, _ = PercentileFilter("x", keep=0.8, lower_is_better=False)({"x": values})
    assert keep.sum() == 80 and keep[20:].all()
    keep, _ = SelfRatingFilter(keep=0.5)({"self_rating": torch.tensor([0.0, 10, 5, 7])})
    assert keep.tolist() == [False, True, False, True]


def test_ds_weight_filter_on_hand_losses():
    # valid mean loss 1.0; losses -> DS weights 1, 2, 4, 1.25, inf
    signals = ds_signals(torch.tensor([1.0, 0.5, 4.0, 0.8, 0.0]), 1.0)
    torch.testing.assert_close(signals["ds_weight"], torch.tensor([1.0, 2.0, 4.0, 1.25, math.inf]))
    keep, weight = DSWeightFilter(keep=0.5)(signals)
    # the 50th percentile of the finite weights (1, 1.25, 2, 4) is 1.625: keep 1 and 1.25; inf never
    assert keep.tolist() == [True, False, False, True, False] and torch.equal(weight, torch.ones(5))
    keep, weight = ImportanceWeights(max_weight=2.0)(signals)
    assert keep.all()
    torch.testing.assert_close(weight[:4], torch.tensor([1.0, 2.0, 0.25, 1.25]))


def test_answer_entropy_filter_counts_each_question_once():
    signals = {"answer_entropy": torch.tensor([0.0, 0.0, 0.0, 0.9, 0.9, 0.5]),
               "first_of_question": torch.tensor([1.0, 0, 0, 1, 0, 1])}
    keep, _ = AnswerEntropyFilter(keep=0.5)(signals)  # question entropies 0, 0.9, 0.5 -> median 0.5
    assert keep.tolist() == [True, True, True, False, False, True]
    keep, _ = AnswerEntropyFilter(threshold=0.1)(signals)
    assert keep.tolist() == [True, True, True, False, False, False]


def test_semievol_threshold_from_the_labeled_population():
    signals = {"token_entropy": torch.tensor([0.1, 0.5, 0.9, 2.0]),
               "labeled_token_entropy": torch.tensor([0.2, 0.4, 0.6, math.nan])}
    keep, _ = EntropyThreshold(percentile=50)(signals)  # tau = median(0.2, 0.4, 0.6) = 0.4
    assert keep.tolist() == [True, False, False, False]
    keep, _ = EntropyThreshold(percentile=50, population="unlabeled")(signals)  # tau = 0.7
    assert keep.tolist() == [True, True, False, False]


def test_selectors_compose_and_empty_selection_names_the_selector():
    signals = {"is_majority": torch.tensor([1.0, 1, 0, 1]), "x": torch.tensor([3.0, 1, 0, 2])}
    keep, _ = apply_selectors([MajorityVote(), PercentileFilter("x", keep=0.5)], signals)
    assert keep.tolist() == [False, True, False, True]  # the percentile is over the 3 majority rows only
    with pytest.raises(EmptySelectionError, match=r"MajorityVote kept nothing: signal 'is_majority'"):
        MajorityVote()({"is_majority": torch.zeros(3)})
    with pytest.raises(EmptySelectionError, match=r"ranges over \[0.5, 0.5\]"):
        EntropyThreshold(percentile=50)({"token_entropy": torch.tensor([0.5]),
                                         "labeled_token_entropy": torch.tensor([0.1])})


def _percentile_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    values = torch.arange(100, dtype=torch.float32)[rank::world]  # each rank holds half
    keep, _ = PercentileFilter("x", keep=0.8)({"x": values})
    torch.save({"cut": global_percentile(values, 80), "kept": values[keep].tolist()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_percentiles_are_global_across_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_percentile_worker, args=(2, port, str(tmp_path)), nprocs=2)
    single = torch.arange(100, dtype=torch.float32)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["cut"] == results[1]["cut"] == global_percentile(single, 80)
    assert sorted(results[0]["kept"] + results[1]["kept"]) == list(range(80))  # same 80 as one process


def test_iwsi_reference_cut_keeps_strictly_below_the_sorted_value():
    signals = {"ds_weight": torch.arange(1.0, 12.0)}  # 11 values: 0.8 x (11 - 1) = 8 is whole
    keep, _ = DSWeightFilter(keep=0.8)(signals)
    assert int(keep.sum()) == 9  # the interpolated percentile is 9.0, kept: <= 9
    keep, _ = DSWeightFilter(keep=0.8, rule="reference")(signals)
    assert keep.tolist() == [True] * 8 + [False] * 3  # sorted[int(0.8 x 11) = 8] = 9, kept: < 9
    naive = [w < sorted(signals["ds_weight"].tolist())[int(0.8 * 11)] for w in signals["ds_weight"].tolist()]
    assert keep.tolist() == naive
    with pytest.raises(ValueError, match="lower-is-better"):
        PercentileFilter("x", rule="reference", lower_is_better=False)


def test_semievol_inconsistent_population_hand_values():
    # questions a (consistent: share 1) and b, c (answers disagree)
    signals = {"token_entropy": torch.tensor([9.0, 9.0, 1.0, 2.0, 3.0, 4.0]),
               "vote_share": torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])}
    assert EntropyThreshold(population="inconsistent").percentile == 30 and EntropyThreshold().percentile == 50
    keep, _ = EntropyThreshold(population="inconsistent")(signals)
    # tau = 30th percentile of [1, 2, 3, 4] = 1.9 (linear); inconsistent kept when H < tau; consistent always
    assert keep.tolist() == [True, True, True, False, False, False]
