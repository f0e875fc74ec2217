"""Test-time adaptation on a stream: predict each batch, then let the method adapt on it.

Each training step is one batch of the stream. The method (`TTAMethod`, one object per method: Tent, SAR, ROID,
TLM, ...) owns the update, its state and its reset; this module keeps the stream loop, the accuracies, the reset
schedule and the logging. The predictions reported (`tta/online_accuracy`) are those made *before* the batch's
update, as in Tent/SAR/ROID; at the label level the non-adapted model's accuracy on the same batches, under the
method's prediction rule, is reported beside it (`tta/source_accuracy`, `policy.reference()`). Gold answers are
read for these metrics only. Both are torchmetrics, synchronised across processes.

Levels:
- `label`: the distribution over the task's C verbalizers at the answer slot (a classification stream);
- `token`: any task, open-ended included: the model answers greedily (the predictions), the task extracts and
  scores the answer for the metrics only, and the method adapts on the model's own tokens.
A method that does not support the level is refused when the module is built; a stream without what the level
needs (no verbalizers at the label level) is refused at setup, naming the task.
Manual optimisation: the method steps; a non-finite loss skips the step and is counted (`tta/skipped_steps`).
Resume (`fit --ckpt_path`): the stream goes on at the next batch with the adapted weights, the optimizer, the
method's state, the outcomes so far and the same source weights for resets (taken at setup, before the checkpoint
is loaded). Under DDP, batch b of the stream goes to rank b mod world and the accuracies count every rank's items.
The mode rule: every pass (predicting, adapting, sampling) runs with dropout off (eval mode), as in RL.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from lightning_modules.checkpointing import TrainableStateMixin, save_config_hyperparameters
from lightning_modules.losses.functional import entropy
from lightning_modules.policy import Policy
from lightning_modules.tta.base import LabelView, TokenView, TTAMethod
from lightning_modules.tta.tent import Tent


class TestTimeAdaptationModule(TrainableStateMixin, L.LightningModule):
    """Args:
        policy: the model and what adapts (LoRA, norm gains, all).
        method: the TTA method (default Tent).
        optimizer: factory over the adapted parameters (default SGD); SAR needs `SAM`.
        level: `label` or `token`.
        max_new_tokens: answer length at the token level.
        reset_every: also reset the method every N batches (1: episodic adaptation); None: only on its own rule.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self, policy: Policy, method: TTAMethod | None = None, optimizer: OptimizerCallable = torch.optim.SGD,
        level: Literal["label", "token"] = "label", max_new_tokens: int = 64, reset_every: int | None = None,
    ) -> None:
        super().__init__()
        save_config_hyperparameters(self)
        self.automatic_optimization = False
        self.policy, self.method = policy, method if method is not None else Tent()
        if level not in self.method.levels:
            raise ValueError(f"{type(self.method).__name__} adapts at the {' and '.join(self.method.levels)} level, "
                             f"not level={level!r}")
        if reset_every is not None and reset_every < 1:
            raise ValueError(f"reset_every must be at least 1 (or None), got {reset_every}")
        self.optimizer_factory, self.level = optimizer, level
        self.max_new_tokens, self.reset_every = max_new_tokens, reset_every
        self.online_accuracy, self.source_accuracy = MeanMetric(), MeanMetric()
        self.reset_steps: list[int] = []
        self.outcomes: list[bool] = []  # this process's items in stream order: right or wrong (paired tables)
        self.source_outcomes: list[bool] = []
        self.predicted: list = []  # the predicted label index (label level) or extracted answer (token level)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        problem = getattr(datamodule, "label_problem", None)
        if self.level == "label" and problem:
            raise ValueError(f"level: label adapts on a classification stream, but {problem}; use level: token")
        view_problem = getattr(datamodule, "view_problem", None)
        if self.method.needs_views and view_problem:
            raise ValueError(f"{type(self.method).__name__} compares each item with a text view of it, but "
                             f"{view_problem}")
        self.method.attach({n: p for n, p in self.policy.model.named_parameters() if p.requires_grad},
                           self.manual_backward)

    def run_state(self) -> dict:
        """This process's part of the stream so far and the method's state (a resumed stream goes on from it)."""
        return super().run_state() | {
            "method": self.method.run_state(), "outcomes": self.outcomes, "source_outcomes": self.source_outcomes,
            "predicted": self.predicted, "reset_steps": self.reset_steps}

    def load_run_state(self, state: dict) -> None:
        super().load_run_state(state)
        self.method.load_run_state(state["method"])
        self.outcomes, self.source_outcomes = state["outcomes"], state["source_outcomes"]
        self.predicted, self.reset_steps = state["predicted"], state["reset_steps"]
        for metric, outcomes in ((self.online_accuracy, self.outcomes), (self.source_accuracy, self.source_outcomes)):
            if outcomes:
                metric.update(torch.tensor(outcomes, dtype=torch.float))

    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.trainable_parameters())

    def on_train_start(self) -> None:
        self.method.check(self.optimizers())

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.eval()  # the mode rule: every pass without dropout, so predictions carry no dropout noise
        optimizer = self.optimizers()  # Lightning's wrapper: its step() advances global_step
        b = len(batch["questions"])
        if self.level == "label":
            view = LabelView(self.policy, batch)
            with torch.no_grad(), self.policy.reference():
                source_logits = LabelView(self.policy, batch).logits()
            logits, metrics = self.method.adapt(view, optimizer)
            predicted = self.method.decide(logits)
            correct = predicted == batch["labels"]
            self.predicted += predicted.tolist()
            source = self.method.decide(source_logits) == batch["labels"]
            self.log("tta/source_accuracy", self._running(self.source_accuracy, source), batch_size=b, prog_bar=True)
            self.source_outcomes += source.tolist()
            metrics.setdefault("entropy", entropy(logits).mean())
        else:
            view = TokenView(self.policy, batch, self.max_new_tokens)
            _, metrics = self.method.adapt(view, optimizer)
            answers = view.answers
            self.predicted += answers.answers
            correct = torch.tensor([t.same(a, q.answer) for t, a, q in zip(batch["tasks"], answers.answers,
                                                                               batch["questions"])])
            self._log_answers(answers.texts, batch)
        self.log("tta/online_accuracy", self._running(self.online_accuracy, correct), batch_size=b, prog_bar=True)
        self.outcomes += correct.tolist()
        self.log("tta/skipped_steps", float(self.method.skipped_steps), batch_size=b)
        self._log_metrics(metrics, b)
        if self.method.should_reset() or (self.reset_every and (batch_idx + 1) % self.reset_every == 0):
            self.method.reset(optimizer)
            self.reset_steps.append(self.global_step)
            self.log("tta/last_reset_step", float(self.global_step), batch_size=b)
        self.log("tta/resets", float(len(self.reset_steps)), batch_size=b)

    def _running(self, metric: MeanMetric, correct: Tensor) -> Tensor:
        """The accuracy over the stream so far (every process's items)."""
        metric.update(correct.float().to(self.device))
        return metric.compute()

    def _log_metrics(self, metrics: dict[str, Tensor], b: int) -> None:
        experiment = getattr(self.logger, "experiment", None)
        for name, value in metrics.items():
            if value.dim() == 0:
                self.log(f"tta/{name}", value, batch_size=b)
            elif hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"tta/{name}", value.detach().float().cpu(), self.global_step)

    def _log_answers(self, texts: list[str], batch: dict) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text") and self.global_step % 10 == 0:
            rows = "".join(f"| {q.answer} | {t!r} |\n" for q, t in zip(batch["questions"][:4], texts[:4]))
            experiment.add_text("tta/answers", "| gold | answer |\n|---|---|\n" + rows, self.global_step)
