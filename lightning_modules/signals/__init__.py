"""Label-free signals: one interface (`base.Signal`) used for selection, RL rewards and evaluation."""

from lightning_modules.signals.base import Signal, score, signal_names
from lightning_modules.signals.compose import Gated, SelectiveComplementary
from lightning_modules.signals.confidence import DeepConf, NegativeEntropy, SelfCertainty, TokenNLL
from lightning_modules.signals.ds_weight import DSWeight
from lightning_modules.signals.gold import GoldAnswer
from lightning_modules.signals.judges import SelfEvaluation, SelfRating
from lightning_modules.signals.reward_model import RewardModelScore
from lightning_modules.signals.votes import AnswerEntropy, ClusterShare, MajorityAnswer, VoteShare

__all__ = ["AnswerEntropy", "ClusterShare", "DSWeight", "DeepConf", "Gated", "GoldAnswer", "MajorityAnswer",
           "NegativeEntropy", "RewardModelScore", "SelectiveComplementary", "SelfCertainty", "SelfEvaluation",
           "SelfRating", "Signal", "TokenNLL", "VoteShare", "score", "signal_names"]
