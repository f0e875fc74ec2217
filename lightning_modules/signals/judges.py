"""The model judges each answer (SPEC §3 Self-filter, §6 RLC). The judge is the current model or the frozen
initial one (`judge`, default per method); prompts go through the chat template.

- `SelfEvaluation` (RLC, Pang et al., ICLR 2024; lafmdp/RLC): "Q: {question}\\nA: {answer}\\nIs the answer to this
  question correct?"; `mode="probability"` (default): P(yes) / (P(yes) + P(no)) of the judge's next token, where
  P(yes) sums the single-token spellings "Yes", " Yes", "yes", " yes", "YES" (likewise no), so tokenisation does
  not matter; `mode="sampled"`: 1 if the judge's sampled reply contains "yes" (the reference's behaviour).
  Default judge: the initial model.
- `SelfRating` (Self-filter, SPEC §3): the judge rates the answer with a rating prompt, greedily by default; the
  number after "Score:" (else the first number) clipped to [low, high], unparsable -> low; `scale` maps it to
  [0, 1]. Default judge: the current model. RLC's quality-task score is `SelfRating(prompt=SCORE_PROMPT, low=1,
  high=10, judge=initial, temperature=1.0, max_new_tokens=6, scale=True)`.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.batching import pad
from lightning_modules.candidates import Candidates, complete
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals.base import Signal

CORRECTNESS_PROMPT = "Q: {question}\nA: {answer}\nIs the answer to this question correct?"
SCORE_PROMPT = "Q: {question}\nA: {answer}\nPlease give the answer a score from 1 to 10. Score:"
RATING_PROMPT = (
    "Below is a question and a candidate answer. Evaluate whether or not the answer is a good example of how "
    "to answer the question correctly, step by step. Rate it from 0 to 10. Please follow the format "
    "'Score: <rating>'.\n\nQuestion: {question}\n\nCandidate answer: {answer}"
)


def single_token_ids(tokenizer, words: list[str]) -> list[int]:
    ids = {tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words}
    return sorted({i[0] for i in ids if len(i) == 1})


def parse_rating(text: str, low: float = 0.0, high: float = 10.0) -> float:
    """The first number after "Score:" (else the first number at all), clipped to [low, high]; unparsable -> low."""
    match = re.search(r"score\s*:\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE) or re.search(r"(-?\d+(?:\.\d+)?)", text)
    return min(max(float(match.group(1)), low), high) if match else low


class _Judge(Signal):
    """Prompts built from each candidate's question and text, run in batches by the judge model."""

    def __init__(self, template: str, judge: Literal["current", "initial"], batch_size: int, strip: bool) -> None:
        super().__init__()
        self.template, self.judge, self.batch_size, self.strip = template, judge, batch_size, strip

    def prompts(self, candidates: Candidates, policy) -> list[list[int]]:
        tok = policy.tokenizer
        out = []
        for i, text in enumerate(candidates.texts):
            chat = policy.format_prompt(self.template.format(question=candidates.question_text(i),
                                                             answer=text.strip() if self.strip else text))
            out.append(tok(chat, add_special_tokens=not tok.chat_template)["input_ids"])
        return out

    def judge_batch(self, prompts: list[list[int]], policy) -> Tensor:
        raise NotImplementedError

    def forward(self, candidates: Candidates, policy) -> Tensor:
        prompts = self.prompts(candidates, policy)
        return torch.cat([self.judge_batch(prompts[s : s + self.batch_size], policy)
                          for s in range(0, len(prompts), self.batch_size)])


class SelfEvaluation(_Judge):
    def __init__(self, mode: Literal["probability", "sampled"] = "probability",
                 judge: Literal["current", "initial"] = "initial", batch_size: int = 16, temperature: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__(CORRECTNESS_PROMPT, judge, batch_size, strip=True)
        self.mode, self.temperature = mode, temperature
        self.deterministic = mode == "probability"  # a sampled reply is drawn anew for each repeat of an answer
        self.generator = torch.Generator().manual_seed(seed)

    def judge_batch(self, prompts: list[list[int]], policy) -> Tensor:
        tok, model = policy.tokenizer, policy.model
        if self.mode == "sampled":
            params = SamplingParams(n=1, temperature=self.temperature, max_new_tokens=8)
            texts = complete(policy, prompts, params, self.generator)
            return torch.tensor([float("yes" in t.lower()) for t in texts])
        ids, mask, _ = pad(prompts, tok.pad_token_id, left=True)
        device = next(model.parameters()).device
        logits = policy.next_token_logits(ids.to(device), mask.to(device)).float()
        probs = logits.softmax(-1)
        yes = probs[:, single_token_ids(tok, ["Yes", " Yes", "yes", " yes", "YES"])].sum(-1)
        no = probs[:, single_token_ids(tok, ["No", " No", "no", " no", "NO"])].sum(-1)
        return (yes / (yes + no).clamp_min(1e-12)).cpu()


class SelfRating(_Judge):
    def __init__(self, prompt: str = RATING_PROMPT, low: float = 0.0, high: float = 10.0, scale: bool = False,
                 judge: Literal["current", "initial"] = "current", temperature: float = 0.0,
                 max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__(prompt, judge, batch_size, strip=False)
        if not low < high:
            raise ValueError(f"SelfRating: low must be below high, got {low} and {high}")
        self.low, self.high, self.scale = low, high, scale
        self.params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens)
        self.deterministic = temperature == 0  # a sampled rating is drawn anew for each repeat of an answer
        self.generator = torch.Generator().manual_seed(seed)

    def judge_batch(self, prompts: list[list[int]], policy) -> Tensor:
        replies = complete(policy, prompts, self.params, self.generator)
        ratings = torch.tensor([parse_rating(reply, self.low, self.high) for reply in replies])
        return (ratings - self.low) / (self.high - self.low) if self.scale else ratings
