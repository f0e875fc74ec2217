from datamodules.tasks.arithmetic import Arithmetic
from datamodules.tasks.base import PromptParts, Question, Task, load_questions
from datamodules.tasks.comparison import Comparison
from datamodules.tasks.paper import ANLI, GSM8K, MATH, SVAMP, AQuA, OpenBookQA, StrategyQA
from datamodules.tasks.sentiment import Sentiment

__all__ = [
    "ANLI", "AQuA", "Arithmetic", "Comparison", "GSM8K", "MATH", "OpenBookQA", "PromptParts", "Question", "SVAMP",
    "Sentiment", "StrategyQA", "Task", "load_questions",
]
