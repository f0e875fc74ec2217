"""IWSI's analysis at our scale (arXiv 2408.09849, its orthogonality figure and its high-DSE samples): on the
self-improvement table's round-0 candidates of a seed (read from the table's generation cache), the DS weight of
every candidate under the pre-trained model, the share of right answers in each DS-weight interval (equal-count
bins, with a 95% Wilson interval), the same over the candidates the majority vote keeps (what IWSI's DS filter
actually sorts), and the candidates with the highest and the lowest DS weight. Writes a PNG and prints the
numbers; gold answers are read for this analysis only.

    python benchmarks/self_improve_table.py --variants lmsi --seeds 0    # the candidates (or any table run)
    python benchmarks/iwsi_analysis.py --seeds 0 --plot docs/iwsi_ds_weight.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib
import torch
from self_improve_table import ROOT, build  # benchmarks/self_improve_table.py, beside this script

from datamodules.generation import HFGenerator
from datamodules.selection import DSWeightFilter
from lightning_modules.signals import MajorityAnswer, score

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = right / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def candidates_of(seed: int, args) -> dict:
    """DS weight, correctness, majority flag and texts of one seed's round-0 candidates."""
    cli, _ = build("iwsi", seed, args)  # the candidates every variant of the seed reads; IWSI's valid set
    data, policy = cli.datamodule, cli.model.policy
    data.setup("fit")
    batch = HFGenerator(batch_size=data.hparams.generation_batch_size, cache_dir=f"{args.runs}/candidates").sample(
        policy, data.questions, data.task, data.params)
    signal = next(s for s in data.selectors if isinstance(s, DSWeightFilter)).signal
    questions = [batch.questions[g] for g in batch.group.tolist()]
    return {
        "ds_weight": score(signal, batch, policy),
        "majority": score(MajorityAnswer(), batch, policy) == 1,
        "correct": torch.tensor([data.task.same(a, q.answer) for a, q in zip(batch.answers, questions)]),
        "texts": [(q.question, text, q.answer) for q, text in zip(questions, batch.texts)],
    }


def bins(weight: torch.Tensor, correct: torch.Tensor, count: int) -> list[dict]:
    """Equal-count DS-weight intervals: [low, high], n, share right and its Wilson interval."""
    order = weight.argsort()
    out = []
    for part in order.tensor_split(count):
        right, n = int(correct[part].sum()), len(part)
        low, high = wilson(right, n)
        out.append({"low": float(weight[part].min()), "high": float(weight[part].max()), "n": n,
                    "share": right / n, "ci": (low, high)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--eval-questions", type=int, default=500)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default="runs/self_improve_table")
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/iwsi_ds_weight.png")
    args = parser.parse_args()

    seeds = [candidates_of(seed, args) for seed in args.seeds]
    pooled = {k: torch.cat([s[k] for s in seeds]) for k in ("ds_weight", "majority", "correct")}
    texts = [t for s in seeds for t in s["texts"]]
    finite = torch.isfinite(pooled["ds_weight"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, (title, subset) in zip(axes, (("all candidates", finite),
                                            ("majority-vote kept (IWSI's DS filter input)",
                                             finite & pooled["majority"]))):
        weight, correct = pooled["ds_weight"][subset], pooled["correct"][subset]
        table = bins(weight, correct, args.bins)
        print(f"\n{title}: {len(weight)} candidates, {correct.float().mean():.3f} right; share right per DS-weight "
              "interval (equal counts, 95% Wilson interval):")
        print("| DS weight | candidates | share right |\n|---|---|---|")
        for b in table:
            print(f"| {b['low']:.3f}-{b['high']:.3f} | {b['n']} | {b['share']:.3f} [{b['ci'][0]:.3f}, "
                  f"{b['ci'][1]:.3f}] |")
        x = range(len(table))
        axis.errorbar(x, [b["share"] for b in table], fmt="o-",
                      yerr=[[b["share"] - b["ci"][0] for b in table], [b["ci"][1] - b["share"] for b in table]])
        axis.axhline(float(correct.float().mean()), color="grey", linestyle="--", label="overall")
        axis.set_xticks(list(x), [f"{b['low']:.3f}-\n{b['high']:.3f}" for b in table], fontsize=7)
        axis.set_xlabel("DS weight interval (equal-count bins; IWSI keeps the low end)")
        axis.set_title(f"{title} (n={len(weight)})", fontsize=9)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("share of right answers")
    figure.suptitle(f"Right answers per DS-weight interval, seed{'s' * (len(args.seeds) > 1)} "
                    f"{', '.join(map(str, args.seeds))}", fontsize=10)
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")
    order = pooled["ds_weight"].nan_to_num(-1).argsort(descending=True).tolist()
    valid = [i for i in order if finite[i]]
    for title, chosen in (("highest DS weight", valid[: args.examples]), ("lowest DS weight", valid[-args.examples:])):
        print(f"\n{title}:")
        for i in chosen:
            question, completion, gold = texts[i]
            print(f"- w {float(pooled['ds_weight'][i]):.3f}, {'right' if pooled['correct'][i] else 'wrong'} "
                  f"(gold {gold}): {question} -> {completion!r}")


if __name__ == "__main__":
    main()
