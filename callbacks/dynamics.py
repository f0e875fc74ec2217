"""QuestionDynamics: how a run gets where it ends, question by question, and label-free figures to stop at its peak
(SPEC §11).

A fixed probe set of questions (`split`, `num_questions`; unlabeled as far as the criteria go) is evaluated through
the one evaluation path (`lightning_modules/evaluation.evaluate`: a greedy answer and `k` samples each) at fit
start, every `every_n_steps` training steps, after every `every_n_epochs`-th epoch (a self-training round, an RL or
TTA pass) and at fit end. Any pipeline: it reads only `pl_module.policy`.

Per question and probe: the majority answer, its vote share (votes / k), the answer entropy (of the distribution
of the k answers, unparsable ones together as one outcome, normalised by log k), the parse rate and the greedy
answer. Label-free figures of a probe (logged as `dynamics/<name>`; never computed from gold):
- `vote_share`, `answer_entropy`, `parse_rate`: means over the questions (sharpening: vote share up, entropy down);
- `flip_rate`: share of questions whose majority answer changed since the previous probe; `greedy_flip_rate` the
  same for the greedy answer;
- `agreement_with_start`: share whose majority equals the first probe's;
- `sharpened_agreement`: mean over questions of vote_share x [majority = the first probe's]: rises while the run
  sharpens the initial consensus, falls when majorities move away from it (ours: a candidate for
  `ModelCheckpoint(monitor="dynamics/sharpened_agreement", mode="max")`, not validated against gold yet).
With gold (evaluation only, `dynamics/audit/<name>`): `match_rate` (majority = gold), `pass_rate` (pass@k),
`greedy_accuracy`, and the transitions of each question's majority against the first probe: `learned` (wrong ->
right), `corrupted` (right -> wrong), `stable_right`, `stable_wrong`, `solvable_at_start` (pass@k > 0 at the first
probe) and `learned_from_zero` (pass@k = 0 at the first probe, majority right now).

Written to the run directory: `dynamics.jsonl` (one line per probe: step, epoch, figures, every question's row) and,
at fit end, `dynamics.png` (per question, its majority's vote share at every probe; with gold, right majorities in
green) also logged to TensorBoard. Its time is the phase `probe` (`time/.../probe` in `phases.json`). The probes are
kept in the callback's checkpoint state (a resumed run goes on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L

from datamodules.generation import cached_sampler, shared_cache
from datamodules.tasks.base import Question, Task
from lightning_modules.evaluation import Evaluation, evaluate
from lightning_modules.progress import phase
from lightning_modules.sampling import SamplingParams
from lightning_modules.storage import write_atomically


def question_rows(evaluation: Evaluation, task: Task) -> list[dict]:
    """One row per probe question: label-free fields, and gold fields where the question has a gold answer."""
    rows = []
    for r in evaluation.rows:
        answers, k = r["sample_answers"], max(len(r["sample_answers"]), 1)
        outcomes = [n for _, n in task.answer_counts(answers)] + [sum(a is None for a in answers)]  # unparsed: one
        probs = [n / k for n in outcomes if n]
        entropy = -sum(p * math.log(p) for p in probs) / math.log(k) if k > 1 else 0.0
        row = {"id": r["id"], "majority": r["majority"], "vote_share": r["votes"] / k if r["majority"] else 0.0,
               "answer_entropy": entropy, "parse_rate": r["parsed"] / k, "greedy": r["greedy_answer"]}
        if r["gold"] is not None:
            row |= {"majority_right": bool(r["maj_correct"]), "pass": bool(r["pass"]),
                    "greedy_right": bool(r["greedy_correct"])}
        rows.append(row)
    return rows


def figures(rows: list[dict], previous: list[dict] | None, first: list[dict], task: Task) -> dict[str, float]:
    """The probe's label-free figures and, where every question has gold, the audit figures (`audit/...`)."""
    same = lambda a, b: (a is None and b is None) or task.same(a, b)  # noqa: E731
    n = max(len(rows), 1)
    mean = lambda values: sum(values) / n  # noqa: E731
    agree = [same(r["majority"], f["majority"]) for r, f in zip(rows, first)]
    out = {"vote_share": mean([r["vote_share"] for r in rows]),
           "answer_entropy": mean([r["answer_entropy"] for r in rows]),
           "parse_rate": mean([r["parse_rate"] for r in rows]), "agreement_with_start": mean(agree),
           "sharpened_agreement": mean([r["vote_share"] * a for r, a in zip(rows, agree)]),
           "flip_rate": mean([not same(r["majority"], p["majority"]) for r, p in zip(rows, previous)]) if previous
           else 0.0,
           "greedy_flip_rate": mean([not same(r["greedy"], p["greedy"]) for r, p in zip(rows, previous)]) if previous
           else 0.0}
    if rows and all("majority_right" in r for r in rows):
        was, now = [f["majority_right"] for f in first], [r["majority_right"] for r in rows]
        out |= {f"audit/{k}": v for k, v in {
            "match_rate": mean(now), "pass_rate": mean([r["pass"] for r in rows]),
            "greedy_accuracy": mean([r["greedy_right"] for r in rows]),
            "learned": mean([not w and x for w, x in zip(was, now)]),
            "corrupted": mean([w and not x for w, x in zip(was, now)]),
            "stable_right": mean([w and x for w, x in zip(was, now)]),
            "stable_wrong": mean([not w and not x for w, x in zip(was, now)]),
            "solvable_at_start": mean([f["pass"] for f in first]),
            "learned_from_zero": mean([not f["pass"] and x for f, x in zip(first, now)]),
        }.items()}
    return out


class QuestionDynamics(L.Callback):
    """Args:
        task: the probe's task (default the datamodule's, a stream's first task).
        split, num_questions: the probe questions (default the validation split: neither trained on nor reported).
        k, temperature, top_p, max_new_tokens, seed: the k sampled answers of each probe.
        every_n_steps: probe every n training steps (0: never); every_n_epochs: after every n-th epoch (0: never).
        batch_size: questions per sampling batch (32 x 8 samples in one batch: 1.2x faster than 8 on 2 CPU cores,
            `benchmarks/probe_batch.py`).
        cache: keep each probe's answers under `<experiment dir>/evaluations`, as `TaskEvaluation` does (a rerun or
            another run from the same weights reads them; the same answers either way).
    """

    def __init__(self, task: Task | None = None, split: str = "valid", num_questions: int = 32, k: int = 8,
                 temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                 every_n_steps: int = 20, every_n_epochs: int = 0, batch_size: int = 32, cache: bool = True) -> None:
        if k < 2:
            raise ValueError(f"QuestionDynamics needs k >= 2 samples per question for a vote, got {k}")
        if every_n_steps < 0 or every_n_epochs < 0:
            raise ValueError("QuestionDynamics: every_n_steps and every_n_epochs must be >= 0")
        self.task, self.split, self.num_questions = task, split, num_questions
        self.sampled = SamplingParams(k, temperature, top_p, max_new_tokens, seed)
        self.greedy = SamplingParams(1, 0.0, 1.0, max_new_tokens, seed)
        self.every_n_steps, self.every_n_epochs, self.batch_size = every_n_steps, every_n_epochs, batch_size
        self.cache = cache
        self.probes: list[dict] = []  # {"step", "epoch", "figures", "questions"}
        self.questions: list[Question] = []

    def _task(self, trainer) -> Task:
        data = trainer.datamodule
        task = self.task or getattr(data, "task", None) or (getattr(data, "tasks", None) or [None])[0]
        if task is None:
            raise ValueError("QuestionDynamics needs a task (its `task` argument or the datamodule's)")
        return task

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not self.questions:  # before any work: a probe that cannot load fails now
            self.questions = self._task(trainer).load(self.split, self.num_questions)

    @phase("probe")
    def probe(self, trainer, pl_module) -> dict[str, float]:
        task = self._task(trainer)
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks: a broadcast under DDP
        sampler = cached_sampler(str(shared_cache(trainer, "evaluations"))) if self.cache else None
        evaluation = evaluate(pl_module.policy, task, self.questions, self.greedy, self.sampled,
                              batch_size=self.batch_size, sampler=sampler)
        rows = question_rows(evaluation, task)
        first = self.probes[0]["questions"] if self.probes else rows
        previous = self.probes[-1]["questions"] if self.probes else None
        found = figures(rows, previous, first, task)
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "figures": found, "questions": rows}
        self.probes.append(record)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / "dynamics.jsonl", "".join(json.dumps(p) + "\n" for p in self.probes))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"dynamics/{k}": v for k, v in found.items()}, step=trainer.global_step)
        return found

    def _log_latest(self, pl_module) -> None:
        """The last probe's figures where Lightning's callbacks read them (`ModelCheckpoint`, `EarlyStopping`,
        `CollapseGuard`), at every step: a monitor sees the figure of the newest probe."""
        for name, value in self.probes[-1]["figures"].items():
            pl_module.log(f"dynamics/{name}", value, logger=False)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.probes:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self.probes[-1]["step"] != step:
            self.probe(trainer, pl_module)
        self._log_latest(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 \
                and self.probes[-1]["step"] != trainer.global_step:
            self.probe(trainer, pl_module)
            self._log_latest(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.probes[-1]["step"] != trainer.global_step:
            self.probe(trainer, pl_module)
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks: a broadcast under DDP
        if trainer.is_global_zero:
            figure = self.trajectories()
            figure.savefig(directory / "dynamics.png", dpi=100)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("dynamics/trajectories", figure, trainer.global_step)

    def trajectories(self):
        """Per question (rows) and probe (columns): the majority's vote share; with gold, right majorities green
        and wrong ones red, a changed majority marked with a dot."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        share = np.array([[q["vote_share"] for q in p["questions"]] for p in self.probes]).T  # (Q, probes)
        figure, axis = plt.subplots(figsize=(max(4, 0.5 * len(self.probes) + 2), max(3, 0.18 * len(share) + 1)))
        gold = all("majority_right" in q for p in self.probes for q in p["questions"])
        if gold:
            right = np.array([[q["majority_right"] for q in p["questions"]] for p in self.probes]).T
            axis.imshow(np.where(right, share, -share), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
        else:
            axis.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for j in range(1, len(self.probes)):
            for i, (now, before) in enumerate(zip(self.probes[j]["questions"], self.probes[j - 1]["questions"])):
                if now["majority"] != before["majority"]:
                    axis.plot(j, i, "k.", markersize=3)
        axis.set_xticks(range(len(self.probes)), [str(p["step"]) for p in self.probes], fontsize=7)
        axis.set_xlabel("training step of the probe")
        axis.set_ylabel("probe question")
        axis.set_title("majority vote share" + (" (green: right, red: wrong)" if gold else ""), fontsize=9)
        figure.tight_layout()
        return figure

    def state_dict(self) -> dict:
        return {"probes": self.probes}

    def load_state_dict(self, state_dict: dict) -> None:
        self.probes = state_dict["probes"]
