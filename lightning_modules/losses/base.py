"""The two kinds of loss a module takes, with the shapes of what they receive, and what every loss returns.

- `SFTLoss` (`WeightedSFTModule.loss`): `forward(token_nll (B, T) float32, mask (B, T) bool, weight (B,))`.
- `PolicyGradientLoss` (`SelfRewardRLModule.loss`): `forward(logp, old_logp, ref_logp (N, T) float32,
  advantages (N,), mask (N, T) bool)`, the log-probs of the response tokens under the policy (with gradient),
  the policy that sampled them and the reference.
A module checks its loss's kind when it is built (`check_loss`), so a loss given to the wrong pipeline fails
before the model loads its first batch, not inside `forward` with a shape error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class LossOutput:
    """`loss` is what is minimised; `metrics` are logged under the module's stage prefix (`train/...`)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class SFTLoss(nn.Module):
    """Weighted supervised fine-tuning: per-token NLL (B, T), the target mask (B, T), per-sample weights (B,)."""

    def forward(self, token_nll: Tensor, mask: Tensor, weight: Tensor) -> LossOutput:
        raise NotImplementedError


class PolicyGradientLoss(nn.Module):
    """Policy gradient on sampled responses: token log-probs (N, T) under the policy, the sampling policy and the
    reference, one advantage per response (N,), the response mask (N, T)."""

    def forward(self, logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor
                ) -> LossOutput:
        raise NotImplementedError


def check_loss(loss: nn.Module, kind: type[nn.Module], module: str) -> nn.Module:
    """`loss` when it is a `kind`, else a `TypeError` saying which base class the module's loss subclasses."""
    if not isinstance(loss, kind):
        takes = " ".join(kind.__doc__.split(":", 1)[1].split()).rstrip(".")
        raise TypeError(f"{module}'s loss must subclass lightning_modules.losses.{kind.__name__} (its forward takes "
                        f"{takes}); got {type(loss).__name__}")
    return loss
