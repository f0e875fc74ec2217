from lightning_modules.losses.base import LossOutput, PolicyGradientLoss, SFTLoss, check_loss
from lightning_modules.losses.weighted_nll import WeightedNLL

__all__ = ["LossOutput", "PolicyGradientLoss", "SFTLoss", "WeightedNLL", "check_loss"]
