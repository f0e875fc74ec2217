"""The dynamics table's reading of its records (benchmarks/dynamics_table.py): the epoch each label-free criterion
picks, hand-computed, and the table and its figure from synthetic records."""

import argparse
import sys

from tiny import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import dynamics_table  # noqa: E402


def probes(vote_share, entropy, flips, agreement):
    audit = {f"audit/{k}": 0.25 for k in dynamics_table.AUDIT}
    return [{"step": 20 * i, "figures": {"vote_share": v, "answer_entropy": e, "flip_rate": f,
                                         "sharpened_agreement": a, **audit}}
            for i, (v, e, f, a) in enumerate(zip(vote_share, entropy, flips, agreement))]


def record(correct_by_epoch, **figures):
    *epochs, end = correct_by_epoch
    phases = {"total": 12.0, "training/probe/evaluation/generation": 1.0, "training/generation": 9.0,
              "training/evaluation/generation": 1.5, "evaluation": 0.5}  # 1 s probing, 2 s held-out evaluations
    return {"correct": {**{f"epoch-{i + 1}": c for i, c in enumerate(epochs)}, "fit_end": end},
            "probes": probes(**figures), "phases": phases}


def test_each_criterion_picks_its_epoch_ties_the_earliest():
    run = record([[1]] * 4, vote_share=[0.4, 0.7, 0.7, 0.6, 0.5], entropy=[0.6, 0.3, 0.2, 0.2, 0.4],
                 flips=[0.0, 0.4, 0.6, 0.7, 0.1], agreement=[0.4, 0.5, 0.3, 0.5, 0.2])
    assert dynamics_table.picks(run) == {"end": 4, "max sharpened_agreement": 1, "max vote_share": 1,
                                         "min answer_entropy": 2, "before flip rate > 0.5": 1,
                                         "before flip rate > 0.3": 0}  # the first probe flips: the start
    calm = record([[1]] * 2, vote_share=[0.4, 0.5, 0.6], entropy=[0.5, 0.4, 0.3], flips=[0.0, 0.1, 0.2],
                  agreement=[0.4, 0.5, 0.6])
    assert dynamics_table.picks(calm)["before flip rate > 0.5"] == dynamics_table.picks(calm)[
        "before flip rate > 0.3"] == 2  # never above: the end
    assert dynamics_table.probe_share(run["phases"]) == 1 / 12
    assert dynamics_table.probe_share(run["phases"], held_out=False) == 0.1


def test_the_table_reads_the_peak_the_picks_and_draws_its_figure(tmp_path, capsys):
    base = [False, False, True, True] * 8
    # epoch 1 the peak (all right), the end half; vote share peaks at epoch 2 (3/4), entropy lowest at the end
    run = record([[True] * 32, [False, True, True, True] * 8, [True, False, False, True] * 8],
                 vote_share=[0.4, 0.6, 0.8, 0.7], entropy=[0.6, 0.4, 0.3, 0.2], flips=[0.0, 0.1, 0.2, 0.3],
                 agreement=[0.4, 0.5, 0.6, 0.5])
    args = argparse.Namespace(pipeline="rl", methods=["ttrl"], seeds=[0], every=20, steps=60, lr=1e-4,
                              probe_questions=4, k=8, table=True, pages=tmp_path, figure="rl")
    dynamics_table.table({("ttrl", 0): run | {"base": base}}, args)
    out = capsys.readouterr().out
    assert "(base 0.500)" in out and "the probe took 0.08 ± 0.00 of a run's time, 0.10 ± 0.00 of it without" in out
    assert "| ttrl | gold-picked peak (reference) | 20 | 1.000 ± 0.000 |" in out
    assert "| ttrl | end | 60 | 0.500 ± 0.000 | - | - |" in out
    assert "| ttrl | max vote_share | 40 | 0.750 ± 0.000 |" in out and out.count("| 0.50 |") == 2  # half the gain
    assert "| ttrl | min answer_entropy | 60 | 0.500 ± 0.000 | +0.000 [+0.000, +0.000] p 1 | 0.00 |" in out
    assert (tmp_path / "dynamics-rl.png").stat().st_size > 0 and "](dynamics-rl.png)" in out


def test_no_share_of_a_peak_within_noise_of_the_end(tmp_path, capsys):
    # the peak (epoch 1) one question of 8 above the end: its interval holds 0, so none of the 6 rows gets a share
    run = record([[True] * 8, [True] * 7 + [False]], vote_share=[0.4, 0.6, 0.8], entropy=[0.6, 0.4, 0.3],
                 flips=[0.0, 0.1, 0.2], agreement=[0.4, 0.6, 0.5])
    args = argparse.Namespace(pipeline="rl", methods=["rent"], seeds=[0], every=20, steps=40, lr=1e-4,
                              probe_questions=4, k=8, table=False, pages=tmp_path, figure="rl")
    dynamics_table.table({("rent", 0): run | {"base": [False] * 8}}, args)
    out = capsys.readouterr().out
    assert "| rent | gold-picked peak (reference) | 20 | 1.000 ± 0.000 | +0.125 [+0.000, " in out
    assert out.count("| - (peak not above the end) |") == 6 and "| rent | end | 40 | 0.875 ± 0.000 | - | - |" in out
