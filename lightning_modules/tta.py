"""Test-time adaptation on a stream: predict each batch, then adapt on it with a label-free loss.

Each training step is one batch of the stream: the predictions reported (`tta/online_accuracy`) are those made
*before* the update, as in Tent/SAR/ROID; the non-adapted model's accuracy on the same batches is reported
beside it (`tta/source_accuracy`, computed with `policy.reference()`). Gold labels are read for these two
metrics only.

Levels:
- `label`: the distribution over the task's C verbalizers at the answer slot (logits (B, C)); the loss gets
  those logits. With the `SAM` optimizer the step is SAR's two-pass update (`sar_adapt_step`, the loss must
  be `ReliableEntropy`, which holds the margin and the EMA that `ModelReset` reads).
- `token`: the model answers greedily (no gradient), then the loss gets the per-token entropy of the
  distributions that produced its answer tokens (B, T) and their mask; accuracy is the task's extraction.
Manual optimisation: one optimizer step per batch; a non-finite loss skips the step and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_modules.losses.entropy import EntropyMinimization
from lightning_modules.losses.functional import entropy, prior_correction
from lightning_modules.optim.sam import SAM
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams, finish_text, generate_batch
from lightning_modules.sft import TrainableStateMixin, save_config_hyperparameters


def sar_adapt_step(
    compute_logits: Callable[[], Tensor], optimizer: SAM, margin: float, ema: float | None,
    ema_momentum: float = 0.9,
) -> tuple[Tensor, float | None]:
    """One SAR update (SPEC §5.3); returns the pre-update logits (detached) and the new EMA.

    S1 = {i: H_i < margin}; loss1 = mean_S1 H, backward; SAM first step; second forward at the perturbed
    weights; S2 = {i in S1: H'_i < margin}; loss2 = mean_S2 H'; ema <- loss2 (first) or m ema + (1 - m) loss2;
    SAM second step (restore, then the base step with the perturbed gradient). An empty S1 skips the update;
    an empty S2 undoes the first step without an update (the reference would produce NaN). `optimizer` is a
    `SAM` or Lightning's wrapper around one (its `step(closure)` is what advances the trainer's step count)."""
    optimizer.zero_grad()
    logits = compute_logits()  # (B, C)
    ent = entropy(logits)  # (B,)
    reliable = ent < margin  # S1; NaN entropies are never reliable
    if not reliable.any():
        return logits.detach(), ema
    ent[reliable].mean().backward()
    state = {"ema": ema}

    def second_pass() -> Tensor | None:
        second = entropy(compute_logits())  # (B,)
        reliable2 = reliable & (second < margin)  # S2 within S1
        if not reliable2.any():
            return None
        loss2 = second[reliable2].mean()
        value = loss2.item()
        if math.isfinite(value):
            state["ema"] = value if state["ema"] is None else ema_momentum * state["ema"] + (1 - ema_momentum) * value
        loss2.backward()
        return loss2

    optimizer.step(closure=second_pass)
    optimizer.zero_grad()
    return logits.detach(), state["ema"]


class TestTimeAdaptationModule(TrainableStateMixin, L.LightningModule):
    """Args:
        policy: the model and what adapts (LoRA, norm gains, all).
        loss: label level `(logits (B, C)) -> LossOutput`; token level `(token_entropy, mask) -> LossOutput`.
        optimizer: factory over the adapted parameters (default SGD, lr 1e-3); `SAM` makes label-level steps
            SAR updates.
        level: `label` or `token`.
        use_prior_correction: report predictions after ROID's prior correction (label level).
        prior_correction_on: `logits` (default, the reference: argmax of logits x prior~) or `probabilities`
            (p x prior~ renormalised; the two differed in 196 of 3,200 predictions in one check).
        max_new_tokens: answer length at the token level.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self, policy: Policy, loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        level: Literal["label", "token"] = "label", use_prior_correction: bool = False,
        prior_correction_on: Literal["logits", "probabilities"] = "logits", max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        save_config_hyperparameters(self)
        self.automatic_optimization = False
        self.policy, self.loss = policy, loss if loss is not None else EntropyMinimization()
        self.optimizer_factory, self.level = optimizer, level
        self.use_prior_correction, self.max_new_tokens = use_prior_correction, max_new_tokens
        self.prior_correction_on = prior_correction_on
        self.counts = {"seen": 0, "correct": 0, "source_correct": 0, "skipped_steps": 0}

    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.trainable_parameters())

    def on_train_start(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    # ------------------------------------------------------------------ label level
    def label_logits(self, batch: dict, model: nn.Module | None = None) -> Tensor:
        """Logits over each sample's verbalizers at the answer slot, float32. (B, C)."""
        model = model or self.policy.model
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: count real tokens only
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                       logits_to_keep=1).logits[:, -1]  # (B, V)
        return logits.gather(-1, batch["verbalizer_ids"]).float()  # (B, C)

    def _predict(self, logits: Tensor) -> Tensor:
        if not self.use_prior_correction:
            return logits.argmax(-1)
        if self.prior_correction_on == "logits":
            return prior_correction(logits, on_logits=True).argmax(-1)
        return prior_correction(logits.softmax(-1)).argmax(-1)

    def _label_step(self, batch: dict, optimizer) -> tuple[Tensor, Tensor | None, dict]:
        compute = lambda: self.label_logits(batch)  # noqa: E731
        if isinstance(optimizer.optimizer, SAM):
            if not hasattr(self.loss, "margin"):
                raise TypeError("the SAM optimizer runs SAR's update: use loss ReliableEntropy")
            logits, ema = sar_adapt_step(compute, optimizer, self.loss.margin(batch["verbalizer_ids"].shape[1]),
                                         self.loss.ema, self.loss.ema_momentum)
            self.loss.update_ema(ema)
            metrics = {"kept_fraction": (entropy(logits) < self.loss.margin(logits.shape[1])).float().mean()}
            return logits, None, metrics
        logits = compute()
        out = self.loss(logits)
        return logits.detach(), out.loss, out.metrics

    # ------------------------------------------------------------------ token level
    def _token_step(self, batch: dict) -> tuple[Tensor, dict]:
        tok = self.policy.tokenizer
        stop = batch["tasks"][0].stop
        prompts = [ids[-n:].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_lengths"])]
        with self.policy.inference():
            completions = generate_batch(self.policy.model, tok, None, 0, prompts,
                                         SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens), stop)
        texts, answers = [], []
        for c in completions:
            text, c = finish_text(tok, c, stop)
            texts.append(text)
            answers.append(c.tokens)
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)  # positions whose distribution produced an answer token
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            response[i, len(p) - 1 : len(p) + len(a) - 1] = True
        token_entropy = self.policy.token_entropy(ids, mask, response)  # (B, T)
        out = self.loss(token_entropy, response)
        correct = [t.same(t.extract(x), q.answer) for t, x, q in zip(batch["tasks"], texts, batch["questions"])]
        metrics = {**out.metrics, "entropy": (token_entropy.detach() * response).sum() / response.sum().clamp_min(1)}
        return out.loss, metrics | {"_correct": torch.tensor(correct), "_texts": texts}

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizer = self.optimizers()  # Lightning's wrapper: its step() advances global_step
        b = len(batch["labels"])
        if self.level == "label":
            with torch.no_grad(), self.policy.reference():
                source_pred = self._predict(self.label_logits(batch))
            logits, loss, metrics = self._label_step(batch, optimizer)
            correct = self._predict(logits) == batch["labels"]
            metrics["entropy"] = entropy(logits).mean()
            self.counts["source_correct"] += int((source_pred == batch["labels"]).sum())
        else:
            loss, metrics = self._token_step(batch)
            correct = metrics.pop("_correct")
            self._log_answers(metrics.pop("_texts"), batch)
        if loss is not None:
            if torch.isfinite(loss):
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
                self.log("tta/loss", loss.detach(), batch_size=b)
            else:
                self.counts["skipped_steps"] += 1
        self.counts["seen"] += b
        self.counts["correct"] += int(correct.sum())
        seen = self.counts["seen"]
        self.log("tta/online_accuracy", self.counts["correct"] / seen, batch_size=b, prog_bar=True)
        if self.level == "label":
            self.log("tta/source_accuracy", self.counts["source_correct"] / seen, batch_size=b, prog_bar=True)
        self.log("tta/skipped_steps", float(self.counts["skipped_steps"]), batch_size=b)
        for name, value in metrics.items():
            self.log(f"tta/{name}", value, batch_size=b)
        self._log_weights()

    def _log_weights(self) -> None:
        weights = getattr(self.loss, "last_weights", None)
        experiment = getattr(self.logger, "experiment", None)
        if weights is not None and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("tta/weights", weights.detach().cpu(), self.global_step)

    def _log_answers(self, texts: list[str], batch: dict) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text") and self.global_step % 10 == 0:
            rows = "".join(f"| {q.answer} | {t!r} |\n" for q, t in zip(batch["questions"][:4], texts[:4]))
            experiment.add_text("tta/answers", "| gold | answer |\n|---|---|\n" + rows, self.global_step)
