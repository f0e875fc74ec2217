"""TaskEvaluation: greedy accuracy, maj@k and pass@k on a task's held-out questions, logged to TensorBoard.

Every figure comes from the one evaluation path, `lightning_modules/evaluation.evaluate` (its docstring defines
maj@k, pass@k and the signal-weighted votes):
- `labelfree test` (QuestionDataModule + AnswerSamplingModule): reads each test step's `Evaluation` and logs
  `test/<name>/greedy_accuracy`, `maj@k`, `pass@k`, `greedy_parse_rate` (with `signals`, it judges the step's
  sampled answers with them).
- during `fit`: evaluates the policy at fit start (the base model), at fit end and, with `every_n_epochs`, at the end
  of every n-th epoch before the last (`epoch-<e>`: a self-training round's model), logging `eval/...` at the
  current step and printing a one-line summary.
With `signals` (any label-free signal of `lightning_modules/signals/`), also per signal `vote@k/<signal>` and
`best@k/<signal>`. Each evaluation writes `predictions-<name>-<when>.jsonl` (question,
completions, extracted answers, gold) to the run directory and a few rows as TensorBoard text.

Names: each evaluation has a `name` (default from its task's prompt settings, e.g. `arithmetic-2shot`) used in its
metric keys (`eval/<name>/greedy_accuracy`, `test/<name>/...`), its text summaries and its predictions file, so
several evaluations in one config never overwrite each other; two with the same name are refused at setup.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from datamodules.generation import cached_sampler, shared_cache
from datamodules.io import check_at_least
from datamodules.tasks.base import Question, Task
from lightning_modules.evaluation import Evaluation, evaluate
from lightning_modules.progress import ProgressLog
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import Signal
from lightning_modules.storage import write_atomically

log = logging.getLogger(__name__)


def predictions_markdown(rows: list[dict]) -> str:
    """Evaluation rows as Markdown for TensorBoard's text panel: per question its text, gold, extracted answer and
    the greedy completion quoted line by line (a table squeezes long cells to a character a line)."""
    blocks = []
    for r in rows:
        mark = "right" if r["greedy_correct"] else "wrong"
        quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in r["greedy_completion"].splitlines())
        blocks.append(f"**{r['id']}**: {r['question']}\n\n- gold: `{r['gold']}`, extracted: `{r['greedy_answer']}` "
                      f"({mark}; ended by {r.get('greedy_finish', 'stop')})\n\n{quoted or '> (empty)'}\n")
    return "\n---\n\n".join(blocks)


class TaskEvaluation(L.Callback):
    """Args:
        task: the task for fit-time evaluation; default the datamodule's task (always in `labelfree test`), so a
            recipe that changes the data task evaluates that task, never a hidden second one.
        task_overrides: fit-time settings that differ from that task's (e.g. `{few_shot: 0}`: zero-shot prompt).
        split, num_questions: the held-out questions.
        k, temperature, top_p, max_new_tokens, seed: the k sampled answers behind maj@k and pass@k (0 = greedy only).
        batch_size: questions per generation batch.
        name: used in metric keys, text summaries and the predictions file (default: from the task's prompt
            settings, `<task>-<k>shot[-plain][-<split>]`).
        at_fit_start, at_fit_end: when to evaluate during fit.
        every_n_epochs: also evaluate after every n-th epoch except the last (which `at_fit_end` covers), with
            `k_at_fit_end` samples like the fit-end evaluation, as `epoch-<e>` (e counted from 1); 0 = never.
        k_at_fit_end: k for the fit-end evaluation (default `k`; 0 = greedy accuracy only, the cheap after-training
            figure).
        num_text_rows: rows shown as TensorBoard text.
        signals, vote_power, vote_weighting: label-free signals reported as a weighted vote (Borda rank weights, or
            the values themselves) and a best-of-k pick over the k samples.
        cache: keep each fit-time evaluation's answers under `<experiment dir>/evaluations` (shared by the
            experiment's versions, keyed by the weights, the task, the questions and the sampling settings, verified
            when read, like the candidates): a rerun reads the base model's answers (and any other weights' it has
            seen) instead of generating them again; the same answers either way.
    """

    def __init__(
        self, task: Task | None = None, task_overrides: dict | None = None, split: str = "test",
        num_questions: int = 100, k: int = 8,
        temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8,
        at_fit_start: bool = True, at_fit_end: bool = True, k_at_fit_end: int | None = None, num_text_rows: int = 5,
        name: str | None = None, signals: list[Signal] | None = None, vote_power: float = 0.5,
        vote_weighting: Literal["rank", "value"] = "rank", every_n_epochs: int = 0, cache: bool = True,
    ) -> None:
        self.task, self.split, self.num_questions, self.k, self._name = task, split, num_questions, k, name
        self.task_overrides = dict(task_overrides or {})
        self._resolved: Task | None = None
        self.sampled = SamplingParams(max(k, 1), temperature, top_p, max_new_tokens, seed)  # n: set per evaluation
        self.greedy = SamplingParams(1, 0.0, 1.0, max_new_tokens, seed)
        self.batch_size, self.at_fit_start, self.at_fit_end = batch_size, at_fit_start, at_fit_end
        self.k_at_fit_end = k if k_at_fit_end is None else k_at_fit_end
        check_at_least("TaskEvaluation", 0, every_n_epochs=every_n_epochs)
        self.every_n_epochs = every_n_epochs
        self.num_text_rows, self.cache = num_text_rows, cache
        self.signals, self.vote_power, self.vote_weighting = list(signals or []), vote_power, vote_weighting
        self.rows: list[dict] = []
        self.results: dict[str, dict[str, float]] = {}  # when -> metrics
        self.predictions: dict[str, list[dict]] = {}  # when -> one row per question (for paired statistics)
        self.counts: dict[str, dict[str, int]] = {}  # when -> questions graded and not

    def name(self, task: Task | None = None) -> str:
        """This evaluation's name: `name`, else derived from the task's prompt settings and the split."""
        if self._name:
            return self._name
        task = task or self.task
        if task is None:
            raise ValueError("TaskEvaluation needs a task (its `task` argument or the datamodule's) or a `name`")
        plain = "-plain" if task.template == "plain" else ""
        split = "" if self.split == "test" else f"-{self.split}"
        return f"{task.name}-{task.few_shot}shot{plain}{split}"

    def _task(self, trainer) -> Task:
        """`task` (else the datamodule's) with `task_overrides` applied to a copy (built once)."""
        if self._resolved is None:
            task = self.task or getattr(trainer.datamodule, "task", None)
            if task is None:
                raise ValueError("TaskEvaluation needs a task (its `task` argument or the datamodule's)")
            if self.task_overrides:
                unknown = sorted(set(self.task_overrides) - set(task.settings()))
                if unknown:
                    raise ValueError(f"TaskEvaluation: task_overrides {unknown} are not settings of "
                                     f"{type(task).__name__} (it has {sorted(task.settings())})")
                task = type(task)(**{**task.settings(), **self.task_overrides})
            self._resolved = task
        return self._resolved

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse two evaluations with one name (they would overwrite each other's keys and files), before any
        work."""
        evaluations = [c for c in trainer.callbacks if isinstance(c, TaskEvaluation)]
        names = [c.name(c._task(trainer)) for c in evaluations]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"{names.count(duplicate)} TaskEvaluation callbacks are named {duplicate!r}: their "
                             "metrics and predictions files would overwrite each other; give each its own `name`")

    # ------------------------------------------------------------------ metrics
    def _counts(self, rows: list[dict], device: torch.device, skipped: int) -> dict[str, int]:
        """Questions graded (with a gold answer) and not (without one, or left out at load for a gold that cannot
        be read: `on_bad_row: skip`), summed over ranks."""
        graded = sum(r["gold"] is not None for r in rows)
        out: dict[str, int] = {}
        for name, count in {"graded": graded, "ungraded": len(rows) - graded + skipped}.items():
            metric = SumMetric().to(device)
            metric.update(torch.tensor(float(count), device=device))
            out[name] = int(metric.compute().item())
        return out

    def _metrics(self, rows: list[dict], device: torch.device) -> dict[str, float]:
        """Rates over the questions with a gold answer."""
        rows = [r for r in rows if r["gold"] is not None]
        columns = {"greedy_accuracy": "greedy_correct", "greedy_parse_rate": "greedy_answer",
                   "greedy_unfinished": "greedy_unfinished"}
        k = len(rows[0]["samples"]) if rows else 0  # in `labelfree test` the module decides k
        if k:
            columns |= {f"maj@{k}": "maj_correct", f"pass@{k}": "pass"}
            for column in rows[0]:
                if column.startswith(("vote/", "best/")):
                    kind, name = column.split("/", 1)
                    columns[f"{kind}@{k}/{name}"] = column
        out = {}
        for name, column in columns.items():
            metric = MeanMetric().to(device)  # syncs across ranks in compute()
            metric.update(torch.tensor([float(r[column] is not None and r[column] is not False) for r in rows],
                                       device=device))
            out[name] = metric.compute().item()
        return out

    def _report(self, trainer: L.Trainer, when: str, rows: list[dict], stage: str) -> dict[str, float]:
        metrics = self._metrics(rows, trainer.strategy.root_device)
        task = self._task(trainer)
        counts = self._counts(rows, trainer.strategy.root_device, task.skipped_gold + task.skipped_prompts)
        self.results[when], self.counts[when], self.predictions[when] = metrics, counts, rows
        name = self.name(task)
        prefix = f"{stage}/{name}"
        summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        log.info("evaluation %s (%s, %d questions): %s", name, when, len(rows), summary)
        if trainer.is_global_zero:
            ungraded = f" ({counts['ungraded']} not graded: no readable gold)" if counts["ungraded"] else ""
            print(f"[{name} {when}] {counts['graded']} questions graded{ungraded}: {summary}")
            directory = Path(trainer.log_dir or trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(directory / f"predictions-{name}-{when}.jsonl",
                             "".join(json.dumps(r) + "\n" for r in rows))
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text(f"{prefix}/predictions_{when}", predictions_markdown(rows[: self.num_text_rows]),
                                    trainer.global_step)
        return {f"{prefix}/{k}": v for k, v in (metrics | counts).items()}

    def before_after(self, title: str = "held-out") -> str:
        """The fit-start and fit-end figures side by side, as a Markdown table."""
        before, after = self.results["fit_start"], self.results["fit_end"]
        lines = [f"| {title} | before training | after training |", "|---|---|---|"]
        lines += [f"| {name} | {value:.3f} | {f'{after[name]:.3f}' if name in after else '-'} |"
                  for name, value in before.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ labelfree test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []
        self.progress = ProgressLog("test", len(trainer.datamodule.questions))

    def on_test_batch_end(self, trainer, pl_module, outputs: Evaluation, batch, batch_idx, dataloader_idx=0) -> None:
        outputs.judge(pl_module.policy, self.signals, self.vote_power, self.vote_weighting)
        self.rows += outputs.rows
        self.progress.update(len(outputs.rows), outputs.num_tokens)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log_dict(self._report(trainer, "test", self.rows, "test"))

    # ------------------------------------------------------------------ during fit
    def evaluate(self, policy, task: Task, questions: list[Question], k: int | None = None,
                 cache_dir: Path | None = None) -> Evaluation:
        """This callback's evaluation of `policy` on `questions` with k sampled answers (default its `k`), the
        answers kept in (and read from) `cache_dir` when given."""
        k = self.k if k is None else k
        # as many rows per batch for the greedy pass (1 per question) as for the sampled one (k per question)
        return evaluate(policy, task, questions, self.greedy, replace(self.sampled, n=k) if k else None,
                        self.signals, self.batch_size, self.batch_size * max(self.k, 1), self.vote_power,
                        self.vote_weighting, cached_sampler(str(cache_dir)) if cache_dir is not None else None)

    def _fit_eval(self, trainer, pl_module, when: str) -> None:
        task = self._task(trainer)
        k = self.k if when == "fit_start" else self.k_at_fit_end
        policy = pl_module.policy
        questions = task.fit_prompts(policy.tokenizer, task.load(self.split, self.num_questions),
                                     getattr(policy.model.config, "max_position_embeddings", None))
        cache = shared_cache(trainer, "evaluations") if self.cache else None  # beside the candidates' cache
        rows = self.evaluate(policy, task, questions, k, cache).rows
        metrics = self._report(trainer, when, rows, "eval")
        if when == "fit_end" and "fit_start" in self.results and trainer.is_global_zero:
            print(self.before_after(f"{len(rows)} held-out, {task.few_shot}-shot prompt"))
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.at_fit_start:
            self._fit_eval(trainer, pl_module, "fit_start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch == trainer.max_epochs or 0 < trainer.max_steps <= trainer.global_step  # fit_end's model
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and not last:
            self._fit_eval(trainer, pl_module, f"epoch-{epoch}")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end:
            self._fit_eval(trainer, pl_module, "fit_end")
