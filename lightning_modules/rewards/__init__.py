from lightning_modules.rewards.answers import GoldReward, MajorityVoteReward
from lightning_modules.rewards.base import Reward, Rollout
from lightning_modules.rewards.certainty import NegativeEntropyReward, SelfCertaintyReward
from lightning_modules.rewards.self_evaluation import SelfEvaluationReward

__all__ = ["GoldReward", "MajorityVoteReward", "NegativeEntropyReward", "Reward", "Rollout", "SelfCertaintyReward",
           "SelfEvaluationReward"]
