"""TLM, test-time learning for LLMs (Hu et al., ICML 2025, arXiv 2505.20633; Fhujinwu/TLM; SPEC §7b): minimise the
perplexity of the test *inputs*, weighting the informative (high-perplexity) ones.

Per item i: CE_i = mean NLL of its prompt's tokens under the current model (with gradient);
mask_i = CE'_i > P0 (`threshold`, 3); coeff_i = lambda exp(CE'_i - P0) (`scale` lambda, 0.1);
loss = sum_i mask_i coeff_i CE_i / sum_i mask_i; when no item passes the threshold the official loss is 0 (the
masked mean): the batch makes no update, counted in `no_update_steps` (logged `tta/no_update`). The official
trainer still calls its optimizer with zero gradients (AdamW's momentum and weight decay move the weights); here
no step is taken.
CE' (no gradient) comes from the frozen reference model (`reference: offline`, the default) or from the current
model (`online`), as the official trainer's two variants. The paper adapts LoRA.
Our reading: the prompt is what the model is given (chat template and exemplars included); every token but the
first is scored.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_modules.distributed import any_rank
from lightning_modules.tta.base import LEVELS, TTAMethod


def tlm_loss(ce: Tensor, ce_select: Tensor, threshold: float = 3.0, scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """ce (B,) with gradient, ce_select (B,) without -> (loss, mask (B,) bool)."""
    mask = ce_select > threshold
    coeff = scale * torch.exp(ce_select - threshold)
    return (mask * coeff * ce).sum() / mask.sum().clamp_min(1), mask


class TLM(TTAMethod):
    levels = LEVELS

    def __init__(self, threshold: float = 3.0, scale: float = 0.1,
                 reference: Literal["offline", "online"] = "offline") -> None:
        super().__init__()
        self.threshold, self.scale, self.reference = threshold, scale, reference
        self.no_update_steps = 0

    def run_state(self) -> dict:
        return super().run_state() | {"no_update_steps": self.no_update_steps}

    def load_run_state(self, state: dict) -> None:
        super().load_run_state(state)
        self.no_update_steps = state["no_update_steps"]

    def adapt(self, view, optimizer) -> tuple[Tensor | None, dict[str, Tensor]]:
        predictions = view.predictions()  # before the update: TLM's pass never reads the answer slot
        if self.reference == "offline":  # first: the reference swaps norm gains in place
            with torch.no_grad(), view.policy.reference():
                ce_select = view.input_nll()
        ce = view.input_nll()  # (B,)
        if self.reference == "online":
            ce_select = ce.detach()
        loss, mask = tlm_loss(ce, ce_select, self.threshold, self.scale)
        update = any_rank(mask.any())  # a rank with nothing above P0 joins the others' step with its loss of 0
        if update:
            self.step(loss, optimizer)
        else:
            self.no_update_steps += 1
        return predictions, {"loss": loss.detach(), "kept_fraction": mask.float().mean(),
                             "input_nll": ce.detach().mean(), "no_update": torch.tensor(float(not update))}
