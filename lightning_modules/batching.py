"""Token batches shared by every pipeline: a training sample tokenised with its prompt masked, right-padded
collation, and the leading pad that reproduces IWSI's official loss code.

A training sample is `prompt` (formatted with the chat template, masked from the loss) followed by
`response + eos` (the loss targets). Prompt and response are tokenised separately and concatenated, so
the boundary between them is exact whatever the tokenizer merges across it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_modules.losses.functional import IGNORE_INDEX


@dataclass
class SFTExample:
    prompt: str  # the formatted prompt text, chat template included
    response: str
    weight: float = 1.0
    where: str = ""  # file:line it came from


@dataclass
class TokenizedExample:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens carry no loss
    weight: float
    truncated: bool


def tokenize_example(tokenizer, example: SFTExample, max_length: int) -> TokenizedExample:
    """Prompt ids + response ids + eos, cut to `max_length`: the response loses its end first; a prompt
    too long to leave one response token loses its beginning. A special token's text inside the response (say
    "<|im_end|>") is read as plain text, so the only end-of-sequence target is the real one at the end."""
    prompt = tokenizer(example.prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    response += [tokenizer.eos_token_id]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        prompt = prompt[-(max_length - 1) :] if len(prompt) >= max_length else prompt
        response = response[: max_length - len(prompt)]
    return TokenizedExample(prompt + response, len(prompt), example.weight, truncated)


def pad(sequences: list[list[int]], pad_token_id: int, left: bool = False,
        targets_from: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The one padding helper of every pipeline: token lists -> ids (B, T), attention mask (B, T) and labels (B, T),
    right-padded (training, scoring) or `left`-padded (prompts that end where the model answers). Labels hold
    row i's tokens from position `targets_from[i]` on (the response), IGNORE_INDEX elsewhere; all IGNORE_INDEX
    without `targets_from`."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if left else 0
        ids[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, start : start + len(seq)] = 1
        if targets_from is not None:
            labels[i, start + targets_from[i] : start + len(seq)] = ids[i, start + targets_from[i] : start + len(seq)]
    return ids, mask, labels


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (prompt and padding = IGNORE_INDEX), weight."""
    input_ids, attention_mask, labels = pad([e.input_ids for e in examples], pad_token_id,
                                            targets_from=[e.n_prompt for e in examples])  # (B, T) each
    weight = torch.tensor([e.weight for e in examples], dtype=torch.float32)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weight": weight}


@torch.no_grad()
def with_leading_pad(batch: dict[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """The batch with one pad token (attention 0, no label) before every row: the first real token then has a
    position that predicts it, as under the left padding of IWSI's official loss code."""
    rows = len(batch["input_ids"])
    pad = {"input_ids": torch.full((rows, 1), pad_token_id), "attention_mask": torch.zeros(rows, 1, dtype=torch.long),
           "labels": torch.full((rows, 1), IGNORE_INDEX)}
    return {k: torch.cat([pad[k].to(v), v], 1) if k in pad else v for k, v in batch.items()}
