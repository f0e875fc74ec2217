"""What every loss module returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossOutput:
    """`loss` is what is minimised; `metrics` are logged under the module's stage prefix (`train/...`)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
