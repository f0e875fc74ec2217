"""Paired statistics of the method tables (benchmarks/paired.py): hand values and a naive bootstrap loop."""

import math
import sys

import pytest
import torch
from tiny import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from paired import cell, mcnemar_exact, paired_difference, pool  # noqa: E402


def test_mcnemar_exact_hand_values():
    a = [1, 1, 1, 1, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 0]  # 5 questions only a gets right, none only b
    assert mcnemar_exact(a, b) == pytest.approx(2 / 2**5)
    a, b = [1, 1, 0, 1], [0, 1, 1, 0]  # 2 vs 1 discordant: p = 2 (C(3,0) + C(3,1)) / 8 = 1
    assert mcnemar_exact(a, b) == 1.0
    assert mcnemar_exact([1, 0], [1, 0]) == 1.0  # no discordant question
    n10, n01 = 12, 3
    want = 2 * sum(math.comb(15, k) for k in range(4)) / 2**15
    assert mcnemar_exact([1] * n10 + [0] * n01, [0] * n10 + [1] * n01) == pytest.approx(want)


def test_paired_bootstrap_against_a_naive_loop():
    gen = torch.Generator().manual_seed(3)
    a = (torch.rand(50, generator=gen) < 0.6).tolist()
    b = (torch.rand(50, generator=gen) < 0.5).tolist()
    got = paired_difference(a, b, resamples=500, seed=7)
    assert got["difference"] == pytest.approx(sum(a) / 50 - sum(b) / 50)
    draw = torch.randint(50, (500, 50), generator=torch.Generator().manual_seed(7))
    boots = sorted(sum(float(a[i]) - float(b[i]) for i in row.tolist()) / 50 for row in draw)
    want = torch.quantile(torch.tensor(boots, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert [got["low"], got["high"]] == pytest.approx(want.tolist())
    assert got["low"] <= got["difference"] <= got["high"]


def test_cluster_bootstrap_against_a_naive_loop():
    gen = torch.Generator().manual_seed(4)
    a = (torch.rand(60, generator=gen) < 0.6).tolist()
    b = (torch.rand(60, generator=gen) < 0.5).tolist()
    clusters = [i % 7 for i in range(60)]  # 7 clusters of 8 or 9 questions
    got = paired_difference(a, b, resamples=300, seed=5, clusters=clusters)
    members = [[i for i in range(60) if i % 7 == c] for c in range(7)]  # in order of first appearance
    draw = torch.Generator().manual_seed(5)
    boots = []
    for _ in range(300):
        idx = [i for c in torch.randint(7, (7,), generator=draw).tolist() for i in members[c]]
        boots.append(sum(float(a[i]) - float(b[i]) for i in idx) / len(idx))
    want = torch.quantile(torch.tensor(boots, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert [got["low"], got["high"]] == pytest.approx(want.tolist())
    singletons = paired_difference(a, b, resamples=300, seed=5, clusters=list(range(60)))
    assert singletons == paired_difference(a, b, resamples=300, seed=5)  # one question per cluster: the plain one
    repeated = [x for x in a[:20] for _ in range(3)], [x for x in b[:20] for _ in range(3)]
    plain, clustered = paired_difference(*repeated), paired_difference(*repeated, clusters=[i // 3 for i in range(60)])
    assert clustered["high"] - clustered["low"] > plain["high"] - plain["low"]  # repeats are not new evidence
    with pytest.raises(ValueError, match="one key per question"):
        paired_difference(a, b, clusters=[0, 1])


def test_identical_methods_differ_by_nothing_and_seeds_pool_by_concatenation():
    same = paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert (same["difference"], same["low"], same["high"], same["mcnemar_p"]) == (0.0, 0.0, 0.0, 1.0)
    a, b = pool([([1, 0], [0, 0]), ([1], [1])])
    assert (a, b) == ([1, 0, 1], [0, 0, 1])
    assert cell(paired_difference([1, 1, 0, 1], [0, 1, 0, 1], resamples=200)).startswith("+0.250 [")
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1, 0], [1])


def test_tables_run_in_parts_and_resume_from_their_records(tmp_path):
    from tables import load_records, run_in_parts

    calls = []

    def run(variant, seed, first):
        calls.append((variant, seed, first))
        if (variant, seed) == ("b", 1):
            raise KeyboardInterrupt  # killed mid-table
        return {"score": [True, False], **({"base": [False, False]} if first else {})}

    with pytest.raises(KeyboardInterrupt):
        run_in_parts(tmp_path, ["a", "b"], [0, 1], run, {"n": 2}, "base")
    assert calls == [("a", 0, True), ("b", 0, False), ("a", 1, False), ("b", 1, False)]
    calls.clear()
    records = run_in_parts(tmp_path, ["a", "b"], [0, 1], lambda v, s, f: {"score": [f]}, {"n": 2}, "base")
    assert set(records) == {("a", 0), ("b", 0), ("a", 1), ("b", 1)}  # only ("b", 1) ran again
    assert records[("b", 1)]["score"] == [False] and "base" in records[("a", 0)]
    assert {"seconds", "revision", "settings"} <= set(records[("a", 0)])
    assert load_records(tmp_path, {"n": 3}) == {}  # records of other settings are not this table's
    with pytest.raises(ValueError, match="seed0-a.json holds a run with other settings"):
        run_in_parts(tmp_path, ["a"], [0], run, {"n": 3}, "base")
