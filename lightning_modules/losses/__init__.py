from lightning_modules.losses.base import LossOutput
from lightning_modules.losses.weighted_nll import WeightedNLL

__all__ = ["LossOutput", "WeightedNLL"]
