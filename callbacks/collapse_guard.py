"""CollapseGuard: stop or reset a run whose logged figures leave a band (an RL policy collapsing onto short,
certain, repeated answers: SPEC §8).

Each training step the guard reads the named metrics from what the module logged this step (`rl/entropy`: the mean
token entropy of the sampled responses; `rl/response_length`: their mean length in tokens; any logged scalar can
be watched). A figure outside its band for `patience` consecutive steps is a collapse: the guard logs it
(`collapse/events`, a warning naming the metric, its value, the band and the step) and then either stops the fit
(`action="stop"`: Lightning ends it after this step, and the last checkpoint is the collapsed model's) or resets
the trainable parameters to their values when the run was set up (before a checkpoint is loaded: the initial
adapter) and clears the optimizer's state (`action="reset"`), and training goes on, or only records it
(`action="log"`: to measure a method as published and say whether it collapsed). Every step logs
`collapse/out_of_band` (1 while some figure is outside its band). The decision is taken on every rank alike.
The events are kept in the callback's checkpoint state, so a resumed run knows what happened before.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import lightning as L
from torch import Tensor

from lightning_modules.distributed import any_rank
from lightning_modules.optim import restore, trainable_values

log = logging.getLogger(__name__)


class CollapseGuard(L.Callback):
    """Args:
        bands: metric name -> [low, high] (either may be null: unbounded), e.g. `{"rl/entropy": [0.05, null],
            "rl/response_length": [4, null]}`.
        patience: consecutive out-of-band steps before acting.
        action: `stop` the fit, `reset` the trainable parameters to their initial values and go on, or only `log`.
    """

    def __init__(self, bands: dict[str, tuple[float | None, float | None]], patience: int = 3,
                 action: Literal["stop", "reset", "log"] = "stop") -> None:
        if not bands:
            raise ValueError("CollapseGuard needs at least one band, e.g. {'rl/entropy': [0.05, null]}")
        for name, band in bands.items():
            low, high = band
            if low is not None and high is not None and low > high:
                raise ValueError(f"CollapseGuard band for {name!r}: low {low} is above high {high}")
        if patience < 1:
            raise ValueError(f"CollapseGuard: patience must be at least 1, got {patience}")
        if action not in ("stop", "reset", "log"):
            raise ValueError(f"CollapseGuard: action must be 'stop', 'reset' or 'log', got {action!r}")
        self.bands, self.patience, self.action = dict(bands), patience, action
        self.outside = 0  # consecutive out-of-band steps
        self.events: list[dict] = []
        self.initial: dict[str, Tensor] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before a checkpoint is restored: the run's initial trainable values
            self.initial = trainable_values(pl_module)

    def _leaving(self, metrics: dict) -> list[str]:
        """'name value outside [low, high]' for each watched figure outside its band (a missing one is an error)."""
        out = []
        for name, (low, high) in self.bands.items():
            if name not in metrics:
                raise KeyError(f"CollapseGuard watches {name!r}, which the module did not log; logged: "
                               f"{', '.join(sorted(metrics))}")
            value = float(metrics[name])
            if math.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
                out.append(f"{name} {value:.4g} outside [{low}, {high}]")
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        leaving = self._leaving(trainer.callback_metrics)
        outside = any_rank(bool(leaving))
        self.outside = self.outside + 1 if outside else 0
        pl_module.log("collapse/out_of_band", float(outside))
        if self.outside >= self.patience:
            step = trainer.global_step
            self.events.append({"step": step, "action": self.action, "why": leaving})
            log.warning("collapse at step %d (%s for %d steps): %s", step, "; ".join(leaving) or "on another rank",
                        self.outside, {"stop": "stopping", "reset": "resetting to the initial weights",
                                       "log": "going on"}[self.action])
            if self.action == "stop":
                trainer.should_stop = True
            elif self.action == "reset":
                restore(pl_module.named_parameters(), self.initial, trainer.optimizers)
            self.outside = 0
        pl_module.log("collapse/events", float(len(self.events)))

    def state_dict(self) -> dict:
        return {"outside": self.outside, "events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        self.outside, self.events = state_dict["outside"], state_dict["events"]
