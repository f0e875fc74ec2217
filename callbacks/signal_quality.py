"""SignalQuality: which label-free signal separates right answers from wrong ones, on this task and model
(SPEC §7, signal quality; gold is read for this report only and never reaches training).

`labelfree test -c configs/eval/signals.yaml`: each test step evaluates its questions (`AnswerSamplingModule`:
greedy and k sampled answers through the one evaluation path); this callback gathers the steps' `Evaluation`s,
computes every configured signal on their sampled answers at the end (nothing is sampled twice), and reports per
signal:
- `auroc`: right vs wrong over all candidates; `ranking_auc`: right vs wrong within a question (ties 1/2), what
  group-normalised RL advantages see;
- `precision@keep` and `recall@keep` of the kept set for each keep fraction (`PercentileFilter`, the selection
  rule of self-training, over all candidates);
- `best@k` (the candidate the signal ranks first) and `vote@k` (the vote weighted by the signal's rank within the
  question, Borda weights (k - r + 1)^vote_power) accuracies beside greedy, maj@k and pass@k, each with its paired
  difference against maj@k.
Every figure carries a 95% percentile-bootstrap interval over questions (`callbacks/statistics.py`; ratios such as
precision are resampled as sums over the questions drawn). Output: a Markdown table printed and written to
`signal_quality.md`, the numbers in `signal_quality.json`, per-question rows in `signal_quality.jsonl`, and per
signal a PNG (`signal_quality-<signal>.png`: histograms of the values of right and wrong answers, ROC curve), also
logged to TensorBoard as figures and scalars (`signals/<signal>/<metric>`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from callbacks.statistics import bootstrap_interval, paired_difference
from datamodules.selection import PercentileFilter, load_with_labeled
from lightning_modules.candidates import Candidates
from lightning_modules.distributed import gather_objects
from lightning_modules.evaluation import Evaluation, judge_samples
from lightning_modules.signals import Signal, signal_names
from lightning_modules.signals.quality import auroc
from lightning_modules.storage import write_atomically


class SignalQuality(L.Callback):
    """Args:
        signals: the signals to report (on the module's k sampled answers per question: `model.init_args.k`).
        keep: the kept fractions at which precision and recall are reported.
        vote_power: the exponent of the Borda vote weights.
        resamples: bootstrap resamples.
    """

    def __init__(self, signals: list[Signal], keep: list[float] | None = None, vote_power: float = 0.5,
                 resamples: int = 2000) -> None:
        self.signals, self.names = list(signals), signal_names(signals)
        self.keep, self.vote_power, self.resamples = list(keep or [0.5, 0.8]), vote_power, resamples
        self.evaluations: list[Evaluation] = []
        self.results: dict[str, dict] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The module's k, each signal's labeled data (loaded disjoint from the held-out questions) and checks,
        before any work."""
        k = getattr(pl_module, "k", 0)
        if k < 2:
            raise ValueError(f"SignalQuality ranks the k sampled answers of each question: set model.init_args.k >= 2 "
                             f"(it is {k})")
        data = trainer.datamodule
        if any(s.labeled is not None for s in self.signals):
            held_out = load_with_labeled(data.task, self.signals, [(data.split, data.num_questions)],
                                         labeled_first=False)[0]
            if [q.id for q in held_out] != [q.id for q in data.task.load(data.split, data.num_questions)]:
                raise ValueError(f"the labeled sets of {', '.join(s.name for s in self.signals if s.labeled)} share "
                                 f"a source with split {data.split!r}; give them another split")
        for signal in self.signals:
            signal.check()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.evaluations = []

    def on_test_batch_end(self, trainer, pl_module, outputs: Evaluation, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.evaluations:
            check_parse_rate(outputs.candidates.table_rows())
        self.evaluations.append(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        policy = pl_module.policy
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        evaluations = [e for part in gather_objects(self.evaluations) for e in part]  # every rank's batches
        candidates = Candidates.concat([e.candidates for e in evaluations])
        greedy = [r["greedy_answer"] for e in evaluations for r in e.rows]
        judged = judge_samples(candidates, policy, self.signals, self.vote_power)
        self.results, rows = self.measure(candidates, judged, greedy)
        if trainer.is_global_zero:
            self.write(trainer, run_dir, candidates, judged, rows)
        pl_module.log_dict({f"signals/{name}/{metric}": value for name, r in self.results.items()
                            for metric, value in r.items() if isinstance(value, float) and math.isfinite(value)})

    # ------------------------------------------------------------------ the numbers
    def measure(self, candidates: Candidates, judged: dict[str, dict], greedy: list[str | None]):
        task = candidates.tasks[0]
        members = candidates.members()
        correct = torch.tensor([task.same(a, candidates.questions[int(g)].answer)
                                for a, g in zip(candidates.answers, candidates.group)])
        q = len(members)
        rows = []
        for g, rows_g in enumerate(members):
            answers = [candidates.answers[i] for i in rows_g]
            gold = candidates.questions[g].answer
            rows.append({"id": candidates.questions[g].id, "gold": gold, "greedy": task.same(greedy[g], gold),
                         "maj": task.same(task.majority(answers)[0], gold), "pass": bool(correct[rows_g].any())})
        for name, j in judged.items():
            for row, vote, best in zip(rows, j["vote"], j["best"]):
                row[f"vote/{name}"], row[f"best/{name}"] = task.same(vote, row["gold"]), task.same(best, row["gold"])
        k = len(candidates) // max(q, 1)
        results = {"baselines": {f"{c}": _mean_ci([r[c] for r in rows], self.resamples) for c in ("greedy", "maj",
                                                                                                  "pass")}}
        results["baselines"]["k"], results["baselines"]["questions"] = k, q
        maj = [r["maj"] for r in rows]
        for signal, name in zip(self.signals, self.names):
            values = judged[name]["values"]
            oriented = values if signal.higher_is_better else -values
            r: dict = {"auroc": _interval(lambda idx, v=oriented: auroc(*_pick(members, idx, v, correct)), q,
                                          self.resamples, auroc(oriented, correct))}
            wins, pairs = _ranking_pairs(oriented, correct, members)
            r["ranking_auc"] = _ratio(wins, pairs, self.resamples)
            for fraction in self.keep:
                kept, _ = PercentileFilter(signal, fraction)({"value": values}, group=candidates.group)
                kept_q = torch.tensor([float(kept[m].sum()) for m in members])
                kept_right = torch.tensor([float((kept & correct)[m].sum()) for m in members])
                right_q = torch.tensor([float(correct[m].sum()) for m in members])
                r[f"precision@{fraction:g}"] = _ratio(kept_right, kept_q, self.resamples)
                r[f"recall@{fraction:g}"] = _ratio(kept_right, right_q, self.resamples)
            for kind in ("best", "vote"):
                scores = [row[f"{kind}/{name}"] for row in rows]
                r[f"{kind}@{k}"] = _mean_ci(scores, self.resamples)
                diff = paired_difference(scores, maj, self.resamples)
                r[f"{kind}@{k}-maj@{k}"] = [diff["difference"], diff["low"], diff["high"], diff["mcnemar_p"]]
            results[name] = r
        return results, rows

    # ------------------------------------------------------------------ the report
    def table(self) -> str:
        base = self.results["baselines"]
        k = base["k"]
        lines = [f"{base['questions']} questions x {k} samples: greedy {_fmt(base['greedy'])}, maj@{k} "
                 f"{_fmt(base['maj'])}, pass@{k} {_fmt(base['pass'])}", "",
                 "| signal | AUROC | ranking AUC | " + " | ".join(f"precision@{f:g}" for f in self.keep)
                 + f" | best@{k} | vote@{k} | best@{k} - maj@{k} | vote@{k} - maj@{k} |",
                 "|---" * (5 + len(self.keep) + 2) + "|"]
        for name in self.names:
            r = self.results[name]
            cells = [_fmt(r["auroc"]), _fmt(r["ranking_auc"])] + [_fmt(r[f"precision@{f:g}"]) for f in self.keep]
            cells += [_fmt(r[f"best@{k}"]), _fmt(r[f"vote@{k}"])]
            cells += [_fmt(r[f"{kind}@{k}-maj@{k}"][:3], sign=True) for kind in ("best", "vote")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, trainer, run_dir: Path, candidates: Candidates, judged: dict[str, dict], rows: list[dict]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        table = self.table()
        print(table)
        write_atomically(run_dir / "signal_quality.md", table + "\n")
        write_atomically(run_dir / "signal_quality.json", json.dumps(self.results, indent=2))
        write_atomically(run_dir / "signal_quality.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        task = candidates.tasks[0]
        correct = torch.tensor([task.same(a, candidates.questions[int(g)].answer)
                                for a, g in zip(candidates.answers, candidates.group)])
        experiment = getattr(trainer.logger, "experiment", None)
        for signal, name in zip(self.signals, self.names):
            figure = plot(name, judged[name]["values"], correct, signal.higher_is_better)
            figure.savefig(run_dir / f"signal_quality-{name}.png", dpi=100)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure(f"signals/{name}", figure, trainer.global_step)
        if hasattr(experiment, "add_text"):
            experiment.add_text("signals/table", table, trainer.global_step)


def check_parse_rate(rows: list[dict]) -> None:
    """Before the rest of the sampling: when no question of the first batch has two readable answers, no vote can
    be taken and every kept set would be empty; the figures say why."""
    parsed: dict[str, int] = {}
    for r in rows:
        parsed[r["question_id"]] = parsed.get(r["question_id"], 0) + (r["answer"] is not None)
    if max(parsed.values(), default=0) < 2:
        unfinished = sum(r["finish_reason"] == "length" for r in rows)
        raise ValueError(f"signal quality: no question among the first {len(parsed)} has two readable answers "
                         f"(parse rate {sum(parsed.values())}/{len(rows)}; {unfinished} answers hit max_new_tokens): "
                         "check the task's answer format against the model's answers, or raise max_new_tokens")


def plot(name: str, values: Tensor, correct: Tensor, higher_is_better: bool):
    """Histograms of the values of right and wrong answers, and the ROC curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_roc

    has = torch.isfinite(values)
    v, c = values[has], correct[has].bool()
    figure, (hist, roc) = plt.subplots(1, 2, figsize=(9, 3.5))
    bins = torch.linspace(v.min().item(), v.max().item() + 1e-9, 31).tolist() if len(v) else 30
    for part, label in ((v[c], "right"), (v[~c], "wrong")):
        if len(part):
            hist.hist(part.tolist(), bins=bins, label=f"{label} ({len(part)})", alpha=0.6, density=True,
                      histtype="stepfilled")
    hist.set_xlabel(f"{name} ({'higher' if higher_is_better else 'lower'} is better)")
    hist.legend()
    roc.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    if c.any() and (~c).any():
        fpr, tpr, _ = binary_roc((v if higher_is_better else -v).double(), c.long())
        roc.plot(fpr.tolist(), tpr.tolist(), label=f"AUROC {auroc(v if higher_is_better else -v, c):.3f}")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _pick(members: list[list[int]], idx: Tensor, values: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    rows = torch.tensor([i for q in idx.tolist() for i in members[q]], dtype=torch.long)
    return values[rows], correct[rows]


def _ranking_pairs(values: Tensor, correct: Tensor, members: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Per question: the (right, wrong) pairs the signal orders right (ties 1/2), and the number of pairs."""
    values = values.nan_to_num(float("-inf"))
    wins, pairs = [], []
    for rows in members:
        v, c = values[rows], correct[rows].bool()
        diff = v[c][:, None] - v[~c][None, :]
        wins.append(((diff > 0).float() + 0.5 * (v[c][:, None] == v[~c][None, :]).float()).sum().item())
        pairs.append(float(c.sum() * (~c).sum()))
    return torch.tensor(wins, dtype=torch.float64), torch.tensor(pairs, dtype=torch.float64)


def _interval(statistic, n: int, resamples: int, point: float) -> list[float]:
    return [point, *bootstrap_interval(statistic, n, resamples)]


def _ratio(numerator: Tensor, denominator: Tensor, resamples: int) -> list[float]:
    """sum(numerator) / sum(denominator) over the questions, with its interval."""
    def ratio(idx: Tensor) -> float:
        d = denominator[idx].sum().item()
        return numerator[idx].sum().item() / d if d else math.nan

    return _interval(ratio, len(numerator), resamples, ratio(torch.arange(len(numerator))))


def _mean_ci(scores: list[bool], resamples: int) -> list[float]:
    x = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    return _interval(lambda idx: x[idx].mean().item(), len(x), resamples, x.mean().item())


def _fmt(value: list[float], sign: bool = False) -> str:
    point, low, high = value[:3]
    f = "{:+.3f}" if sign else "{:.3f}"
    return f"{f.format(point)} [{f.format(low)}, {f.format(high)}]"
