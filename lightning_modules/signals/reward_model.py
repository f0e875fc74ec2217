"""An external reward model's score (RM-filter, SPEC §3): a sequence-classification model with one logit scores
`question + eos + answer` (the paper used OpenAssistant/reward-model-deberta-v3-large-v2). `check()` reads the
model's config alone, before any generation; the model loads once, on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.model_store import resolve_model
from lightning_modules.signals.base import Signal


def check_reward_model(model_dir: str) -> None:
    """A `FileNotFoundError` or `ValueError` naming `model_dir` unless it is a sequence classifier with one
    label: read from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model_dir), trust_remote_code=False)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward model {model_dir} is not a sequence classifier (architectures: {architectures})")
    if config.num_labels != 1:
        raise ValueError(f"reward model {model_dir} has {config.num_labels} labels; one score is expected")


class RewardModelScore(Signal):
    judge = "none"

    def __init__(self, model: str, batch_size: int = 16) -> None:
        super().__init__()
        self.model_dir, self.batch_size = model, batch_size
        self._loaded: tuple | None = None  # (tokenizer, model): not a submodule, so never in a checkpoint

    def check(self) -> None:
        check_reward_model(self.model_dir)

    def _load(self) -> tuple:
        if self._loaded is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.check()
            path = resolve_model(self.model_dir)
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False).eval()
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
                model.config.pad_token_id = tok.pad_token_id
            self._loaded = (tok, model)
        return self._loaded

    def forward(self, candidates: Candidates, policy) -> Tensor:
        tok, model = self._load()
        sep = tok.eos_token or tok.sep_token or "\n"
        texts = [f"{candidates.question_text(i)}{sep}{t}" for i, t in enumerate(candidates.texts)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = tok(texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                scores.append(model(**enc).logits[:, 0].float())
        return torch.cat(scores)
