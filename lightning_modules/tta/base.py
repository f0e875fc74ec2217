"""What a test-time adaptation method is: one object that owns its whole update, its state and its reset.

`TTAMethod.adapt(view, optimizer) -> (predictions, metrics)`: given one stream batch as a view (below) and the
optimizer over the adapted parameters, make the method's update(s) and return the predictions made *before*
them (label level: the logits (B, C) of the first pass; token level: None, the view's answers were generated
before `adapt` was called) and its metrics (scalars are logged as `tta/<name>`, 1-D tensors as histograms).
The LightningModule (`module.py`) keeps only the stream loop, the accuracy metrics and the reset schedule.

Views (the batch's prediction functions, under the model as it is now, with gradient):
- `LabelView.logits()`: (B, C) float32 over the task's verbalizers at the answer slot; `entropy()`: (B,);
  `view_logits()`: the same under the stream's text view, mapped back (methods with `needs_views`).
- `TokenView`: `answers` (greedy, generated before any update: the reported predictions); `token_entropy(c)`
  (N, T) and its mask for candidates `c`; `entropy()`: each answer's mean token entropy (B,); `sample(n, T)`;
  `response_nll(c)`: (N, T) token NLL of candidates' responses.
- both: `input_nll()`: (B,) mean NLL of each prompt's own tokens (TLM); `predictions()`: what to report when
  the update does not start from `logits()` (call it before updating).

State: what a method carries from batch to batch (an EMA, a class prior, a sampling generator, the skip count) is
named in `run_state()` / `load_run_state()`; the module puts it in each checkpoint, per process, so a resumed
stream goes on as if never stopped. `attach` snapshots the adapted parameters when the run is set up (before a
checkpoint is loaded), which is the source model that `reset()` restores, and wires the module's backward (under
DDP it synchronises the gradients). A decision to skip an update is taken on every rank alike (`all_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_modules.batching import pad
from lightning_modules.candidates import Candidates, candidate_tensors, sample
from lightning_modules.distributed import all_ranks
from lightning_modules.losses.functional import IGNORE_INDEX, entropy, predicting_labels
from lightning_modules.optim import restore, unwrap
from lightning_modules.optim.sam import SAM
from lightning_modules.sampling import SamplingParams

LEVELS = ("label", "token")


class LabelView:
    """A classification batch: the distribution over each item's verbalizers at the answer slot."""

    level = "label"

    def __init__(self, policy, batch: dict) -> None:
        self.policy, self.batch = policy, batch
        self.num_classes = batch["verbalizer_ids"].shape[1]
        self.first: Tensor | None = None  # the first pass's logits, detached: the pre-update predictions

    def logits(self) -> Tensor:
        """(B, C) float32, with gradient when enabled."""
        out = self._logits(self.batch["input_ids"], self.batch["attention_mask"])
        if self.first is None:
            self.first = out.detach()
        return out

    def view_logits(self) -> Tensor:
        """The same items under the stream's text view (options rotated, or exemplars reordered), mapped back to
        the items' class order. (B, C) float32."""
        out = self._logits(self.batch["view_input_ids"], self.batch["view_attention_mask"])
        return out.new_empty(out.shape).scatter(1, self.batch["view_perm"].to(out.device), out)

    def _logits(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        out = self.policy.next_token_logits(input_ids, mask)  # (B, V)
        return out.gather(-1, self.batch["verbalizer_ids"]).float()  # (B, C)

    def entropy(self) -> Tensor:
        return entropy(self.logits())

    def predictions(self) -> Tensor:
        if self.first is None:
            with torch.no_grad():
                self.logits()
        return self.first

    def input_nll(self) -> Tensor:
        return input_nll(self.policy, self.batch["prompt_ids"])


class TokenView:
    """An open-ended batch: the model's greedy answers (made when the view is built, before any update)."""

    level = "token"

    def __init__(self, policy, batch: dict, max_new_tokens: int) -> None:
        self.policy, self.batch, self.max_new_tokens = policy, batch, max_new_tokens
        self.answers = self.sample(1, 0.0)

    def sample(self, n: int, temperature: float, generator: torch.Generator | None = None) -> Candidates:
        """n answers per item (no gradient): `temperature` 0 is greedy."""
        params = SamplingParams(n=n, temperature=temperature, max_new_tokens=self.max_new_tokens)
        b = self.batch
        return sample(self.policy, b["questions"], b["tasks"], params, generator, suffix_ids=b["prompt_ids"],
                      prefix_ids=[])

    def _tensors(self, candidates: Candidates) -> tuple[Tensor, Tensor, Tensor]:
        device = next(self.policy.parameters()).device
        return candidate_tensors(candidates, self.policy.tokenizer.pad_token_id, device)

    def token_entropy(self, candidates: Candidates | None = None) -> tuple[Tensor, Tensor]:
        """The entropy of each distribution that produced a response token (N, T) float32, and where (N, T) bool."""
        ids, mask, labels = self._tensors(candidates or self.answers)
        at = predicting_labels(labels)
        return self.policy.token_entropy(ids, mask, at), at

    def entropy(self) -> Tensor:
        """Each greedy answer's mean token entropy (B,); NaN for an empty answer."""
        ent, at = self.token_entropy()
        count = at.sum(-1)
        return torch.where(count > 0, ent.sum(-1) / count.clamp_min(1), torch.nan)

    def response_nll(self, candidates: Candidates) -> tuple[Tensor, Tensor]:
        """Token NLL of each response token (N, T), and where (N, T) bool."""
        ids, mask, labels = self._tensors(candidates)
        return self.policy.token_nll(ids, mask, labels), labels != IGNORE_INDEX

    def predictions(self) -> None:
        return None

    def input_nll(self) -> Tensor:
        return input_nll(self.policy, self.batch["prompt_ids"])


def input_nll(policy, prompts: list[list[int]]) -> Tensor:
    """Mean NLL of each prompt's tokens (every token but the first, which nothing predicts). (B,) float32."""
    device = next(policy.parameters()).device
    ids, mask, labels = pad(prompts, policy.tokenizer.pad_token_id, targets_from=[1] * len(prompts))
    return policy.sequence_nll({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                "labels": labels.to(device)})


class TTAMethod(nn.Module):
    """Subclasses set `levels` and implement `adapt`; `decide`, `check`, `should_reset` and `reset_state` are
    optional. `step(loss, optimizer)` is the plain update (a non-finite loss skips it and is counted)."""

    levels: ClassVar[tuple[str, ...]] = ("label",)
    needs_views = False  # reads `LabelView.view_logits()`: a stream without text views is refused at setup

    def __init__(self) -> None:
        super().__init__()
        self.skipped_steps = 0
        self.adapted: dict[str, nn.Parameter] = {}
        self.source: dict[str, Tensor] = {}
        self.backward: Callable[[Tensor], None] = Tensor.backward
        self.generator: torch.Generator | None = None  # a method that samples draws from its own generator

    def attach(self, named_parameters: dict[str, nn.Parameter], backward: Callable[[Tensor], None] | None = None,
               ) -> None:
        """The adapted parameters, whose current values become the source that `reset()` restores, and the
        backward to call (the LightningModule's `manual_backward`; default `Tensor.backward`)."""
        self.adapted = dict(named_parameters)
        self.source = {n: p.detach().clone() for n, p in self.adapted.items()}
        self.backward = backward or Tensor.backward

    def run_state(self) -> dict:
        """What the method carries from batch to batch (plain values and tensors), for a checkpoint."""
        state = {"skipped_steps": self.skipped_steps}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_run_state(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]
        if self.generator is not None:
            self.generator.set_state(state["generator"])

    def zero_loss(self) -> Tensor:
        """A loss of 0 over the adapted parameters: a rank with nothing to learn from while others step still joins
        the gradient all-reduce."""
        return sum((p * 0).sum() for p in self.adapted.values())

    def check(self, optimizer) -> None:
        """Refuse an optimizer the method cannot use (before the first batch)."""
        if isinstance(unwrap(optimizer), SAM):
            raise TypeError(f"{type(self).__name__} makes plain steps; the SAM optimizer is for SAR's two-pass update")

    def adapt(self, view, optimizer) -> tuple[Tensor | None, dict[str, Tensor]]:
        raise NotImplementedError

    def decide(self, logits: Tensor) -> Tensor:
        """The label predicted from the logits (B, C) -> (B,)."""
        return logits.argmax(-1)

    def step(self, loss: Tensor, optimizer) -> bool:
        if not all_ranks(torch.isfinite(loss)):
            self.skipped_steps += 1
            return False
        optimizer.zero_grad()
        self.backward(loss)
        optimizer.step()
        return True

    def should_reset(self) -> bool:
        return False

    def reset(self, optimizer=None) -> None:
        """Adapted parameters back to the source values (bit-exact), the optimizer's state (momentum) cleared,
        the method's own state back to its start."""
        restore(self.adapted.items(), self.source, [] if optimizer is None else [optimizer])
        self.reset_state()

    def restore_source(self) -> None:
        restore(self.adapted.items(), self.source)

    def reset_state(self) -> None:
        pass


class NoAdaptation(TTAMethod):
    """The baseline: predicts, never updates."""

    levels = LEVELS

    def adapt(self, view, optimizer) -> tuple[Tensor | None, dict[str, Tensor]]:
        return view.predictions(), {}
