"""Token batches shared by every pipeline: a training sample tokenised with its prompt masked, right-padded
collation, and the leading pad that reproduces IWSI's official loss code.

A training sample is `prompt` (formatted with the chat template, masked from the loss) followed by
`response + eos` (the loss targets). Prompt and response are tokenised separately and concatenated, so
the boundary between them is exact whatever the tokenizer merges across it.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    user_text: str = ""  # the user's text inside `prompt` (from a data file): tokenised as plain text


@dataclass
class TokenizedExample:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens carry no loss
    weight: float
    truncated: bool


def encode(tokenizer, text: str, user_texts: Sequence[str] = (), add_special_tokens: bool = False) -> list[int]:
    """`text`'s token ids, where the `user_texts` inside it (questions, prompts, exemplars from data files, in
    order) stay text: a special token's string in them ("<|im_end|>") is tokenised as plain characters, never as
    the token, so a data file cannot forge a chat turn. Without such a string in them the ids are exactly
    `tokenizer(text)`'s."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    if not any(s in u for u in user_texts for s in specials):
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ids, at = [], 0
    for i, user in enumerate(user_texts):
        start = text.find(user, at)
        if start < 0:
            raise ValueError(f"user text {user[:40]!r} is not in the rendered prompt")
        ids += tokenizer(text[at:start], add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        ids += tokenizer(user, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = start + len(user)
    return ids + tokenizer(text[at:], add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer, example: SFTExample, max_length: int) -> TokenizedExample:
    """Prompt ids + response ids + eos, cut to `max_length`: the response loses its end first; a prompt
    too long to leave one response token loses its beginning. A special token's text inside the response (say
    "<|im_end|>") is read as plain text, so the only end-of-sequence target is the real one at the end."""
    prompt = encode(tokenizer, example.prompt, [example.user_text] if example.user_text else [],
                    add_special_tokens=not tokenizer.chat_template)
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
