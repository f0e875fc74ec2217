"""Tent (Wang et al., ICLR 2021; SPEC §5.1) and EM-FT (arXiv 2505.15134; SPEC §7): minimise the entropy of the
model's own predictions.

Label level: loss = mean_i H(q_i), q_i the distribution over the task's C verbalizers.
Token level: loss = the mean over answers of each answer's mean token entropy H(p_t) (EM-FT's
L = E_y[(1/|y|) sum_t H(p_t)], `average: answers`, empty answers left out; `average: tokens` pools every token of
the batch), over the model's own answers: the greedy answers that are the batch's predictions (`answers: greedy`,
Tent), or `samples` answers per item sampled at `temperature`
(`answers: sampled`: EM-FT's token-level entropy minimisation on its own samples). Sampled tokens are constants;
prompt and padding are masked. SPEC §8: this can collapse on open-ended text; watch `tta/entropy` and the answers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_modules.losses.functional import entropy
from lightning_modules.tta.base import LEVELS, TTAMethod


class Tent(TTAMethod):
    levels = LEVELS

    def __init__(self, answers: Literal["greedy", "sampled"] = "greedy", samples: int = 1,
                 temperature: float = 1.0, seed: int = 0, average: Literal["answers", "tokens"] = "answers") -> None:
        super().__init__()
        self.answers, self.samples, self.temperature, self.average = answers, samples, temperature, average
        self.generator = torch.Generator().manual_seed(seed)

    def adapt(self, view, optimizer) -> tuple[Tensor | None, dict[str, Tensor]]:
        if view.level == "label":
            logits = view.logits()  # (B, C)
            loss = entropy(logits).mean()
            self.step(loss, optimizer)
            return logits.detach(), {"loss": loss.detach()}
        own = view.answers if self.answers == "greedy" else view.sample(self.samples, self.temperature, self.generator)
        token_entropy, at = view.token_entropy(own)  # (N, T) each
        if self.average == "answers":
            per_answer = (token_entropy * at).sum(-1) / at.sum(-1).clamp_min(1)
            loss = per_answer.sum() / at.any(-1).sum().clamp_min(1)
        else:
            loss = (token_entropy * at).sum() / at.sum().clamp_min(1)
        self.step(loss, optimizer)
        return None, {"loss": loss.detach(), "entropy": loss.detach()}
