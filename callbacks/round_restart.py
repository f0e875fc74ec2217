"""RestartEachRound: every self-training round after the first trains from the run's initial weights on the data
that the previous round's model sampled, as STaR's outer loop does (arXiv 2203.14465, Algorithm 1: every
iteration fine-tunes the original pre-trained model), instead of going on from the previous round's weights (LMSI
and IWSI as published, the default without this callback).

Lightning reloads a round's data (`SelfGeneratedDataModule` samples with the model trained so far) before
`on_train_epoch_start`; there, at the first epoch of a later round, the trainable parameters go back to their values
when the run was set up (before a checkpoint is loaded: the initial adapter) and the optimizer's state is cleared
(learning rates kept; a learning-rate schedule is not restarted). The round last started is kept in the callback's
checkpoint state, so a run resumed inside a round is not restarted again.
"""

from __future__ import annotations

import logging

import lightning as L
from torch import Tensor

from lightning_modules.optim import restore, trainable_values

log = logging.getLogger(__name__)


class RestartEachRound(L.Callback):
    def __init__(self) -> None:
        self.initial: dict[str, Tensor] = {}
        self.round: int | None = None  # the round whose training has begun
        self.restarts: list[int] = []  # the rounds that started from the initial weights

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(trainer.datamodule, "round"):
            raise TypeError(f"RestartEachRound needs a datamodule with rounds (SelfGeneratedDataModule), got "
                            f"{type(trainer.datamodule).__name__}")
        if trainer.datamodule.hparams.get("labeled_warmup"):
            raise ValueError("RestartEachRound would undo SemiEvol's labeled warm-up (round 0) when round 1 starts; "
                             "use one or the other")
        self.initial = trainable_values(pl_module)  # before a checkpoint is restored

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        round_ = trainer.datamodule.round  # set when the round's data was loaded, just before this hook
        if self.round is not None and round_ > self.round:
            restore(pl_module.named_parameters(), self.initial, trainer.optimizers)
            self.restarts.append(round_)
            log.info("round %d trains from the initial weights (RestartEachRound)", round_)
        self.round = round_

    def state_dict(self) -> dict:
        return {"round": self.round, "restarts": self.restarts}

    def load_state_dict(self, state_dict: dict) -> None:
        self.round, self.restarts = state_dict["round"], state_dict["restarts"]
