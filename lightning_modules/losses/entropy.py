"""Tent (Wang et al., ICLR 2021): minimise the entropy of the model's own predictions.

Label level: loss = mean_i H(q_i), q_i the distribution over the task's C verbalizers.
Token level (`TokenEntropyMinimization`): loss = mean over response tokens of H(p_t) on the model's own answers
(sampled tokens are constants; prompt and padding masked). SPEC §8: this can collapse on open-ended text;
watch `tta/entropy` and the answers logged as text.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.losses.base import LossOutput
from lightning_modules.losses.functional import entropy


class EntropyMinimization(nn.Module):
    def forward(self, logits: Tensor) -> LossOutput:
        """logits (B, C)."""
        ent = entropy(logits)  # (B,)
        return LossOutput(ent.mean(), {"kept_fraction": ent.new_ones(())})


class TokenEntropyMinimization(nn.Module):
    def forward(self, token_entropy: Tensor, mask: Tensor) -> LossOutput:
        """token_entropy (B, T) float32, mask (B, T) bool: the response positions."""
        count = mask.sum().clamp_min(1)
        loss = (token_entropy * mask).sum() / count
        return LossOutput(loss, {"kept_fraction": (mask.sum(-1) > 0).float().mean()})
