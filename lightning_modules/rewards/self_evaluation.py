"""RLC's self-evaluation reward (Pang et al., ICLR 2024; reference: lafmdp/RLC).

The judge is the frozen initial model (`policy.reference()`: the adapter disabled). Correctness prompt:
"Q: {question}\\nA: {answer}\\nIs the answer to this question correct?" (through the chat template).
- `mode="probability"` (default): P(yes) / (P(yes) + P(no)) of the judge's next token, where P(yes) sums the
  single-token spellings "Yes", " Yes", "yes", " yes" (and likewise for no), so tokenisation does not matter;
- `mode="sampled"`: 1 if the judge's sampled reply contains "yes" (the reference's behaviour);
- `mode="score"`: quality tasks; "give a score from 1 to 10", the first number parsed, clipped to [1, 10],
  scaled to [0, 1]; unparsable -> 0.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.rewards.base import Reward, Rollout
from lightning_modules.sampling import SamplingParams, finish_text, generate_batch

CORRECTNESS_PROMPT = "Q: {question}\nA: {answer}\nIs the answer to this question correct?"
SCORE_PROMPT = "Q: {question}\nA: {answer}\nPlease give the answer a score from 1 to 10. Score:"


def single_token_ids(tokenizer, words: list[str]) -> list[int]:
    ids = {tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words}
    return sorted({i[0] for i in ids if len(i) == 1})


class SelfEvaluationReward(Reward):
    def __init__(self, mode: Literal["probability", "sampled", "score"] = "probability", batch_size: int = 16,
                 temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.mode, self.batch_size, self.temperature = mode, batch_size, temperature
        self.generator = torch.Generator().manual_seed(seed)

    def _prompts(self, rollout: Rollout, policy) -> list[list[int]]:
        template = SCORE_PROMPT if self.mode == "score" else CORRECTNESS_PROMPT
        tok = policy.tokenizer
        out = []
        for i, text in enumerate(rollout.texts):
            p = int(rollout.group[i])
            question = rollout.tasks[p].format_question(rollout.questions[p])
            chat = policy.format_prompt(template.format(question=question, answer=text.strip()))
            out.append(tok(chat, add_special_tokens=not tok.chat_template)["input_ids"])
        return out

    def forward(self, rollout: Rollout, policy) -> Tensor:
        prompts = self._prompts(rollout, policy)
        rewards = []
        with policy.inference(), policy.reference() as judge:
            for s in range(0, len(prompts), self.batch_size):
                chunk = prompts[s : s + self.batch_size]
                rewards.append(self._probability(judge, policy, chunk) if self.mode == "probability"
                               else self._generated(judge, policy, chunk))
        return torch.cat(rewards)

    def _probability(self, judge, policy, prompts: list[list[int]]) -> Tensor:
        tok = policy.tokenizer
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        device = next(judge.parameters()).device
        logits = judge(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=1).logits[:, -1].float()
        probs = logits.softmax(-1)
        yes = probs[:, single_token_ids(tok, ["Yes", " Yes", "yes", " yes", "YES"])].sum(-1)
        no = probs[:, single_token_ids(tok, ["No", " No", "no", " no", "NO"])].sum(-1)
        return (yes / (yes + no).clamp_min(1e-12)).cpu()

    def _generated(self, judge, policy, prompts: list[list[int]]) -> Tensor:
        params = SamplingParams(n=1, temperature=self.temperature, max_new_tokens=8 if self.mode == "sampled" else 6)
        texts = [finish_text(policy.tokenizer, c, ())[0]
                 for c in generate_batch(judge, policy.tokenizer, None, 0, prompts, params, (), self.generator)]
        if self.mode == "sampled":
            return torch.tensor([float("yes" in t.lower()) for t in texts])
        return torch.tensor([_score(t) for t in texts])


def _score(text: str) -> float:
    match = re.search(r"\d+(?:\.\d+)?", text)
    return (min(max(float(match.group()), 1.0), 10.0) - 1) / 9 if match else 0.0
