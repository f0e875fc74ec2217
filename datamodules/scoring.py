"""Signals that need a model pass: IWSI's per-sample loss under the pre-trained model, the Self-filter rating,
and an external reward model's score. Teacher-forced passes are batched by length and use the policy's
chunked float32 log-softmax (`Policy.sequence_nll`); each shows a progress bar.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from datamodules.collate import SFTExample, collate, tokenize_example
from lightning_modules.losses.functional import IGNORE_INDEX
from lightning_modules.model_store import resolve_model
from lightning_modules.sampling import SamplingParams, finish_text, generate_batch

RATING_PROMPT = (
    "Below is a question and a candidate answer. Evaluate whether or not the answer is a good example of how "
    "to answer the question correctly, step by step. Rate it from 0 to 10. Please follow the format "
    "'Score: <rating>'.\n\nQuestion: {question}\n\nCandidate answer: {answer}"
)


def sample_losses(
    policy, examples: Sequence[SFTExample], tokens: Literal["all", "completion"] = "all", batch_size: int = 16,
    max_length: int = 1024, reference: bool = True, progress: bool = True, first_token_from_pad: bool = False,
) -> torch.Tensor:
    """Per-sample mean NLL in the training format (SPEC §2: `all` = every non-pad token of prompt + answer, the
    official code's reading; `completion` = the answer's tokens only), under the pre-trained model
    (`policy.reference()`) unless `reference=False`. (N,) float32, in the order given.
    `first_token_from_pad` (with `all`): also score the first token, predicted from a pad position, as IWSI's
    official `record_loss.py` does with its left padding (`with_leading_pad`); it reproduces that code to 5e-7."""
    tokenized = [tokenize_example(policy.tokenizer, e, max_length) for e in examples]
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    out = torch.empty(len(tokenized))
    context = policy.reference() if reference else contextlib.nullcontext()
    with policy.inference(), context:
        for start in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress):
            idx = order[start : start + batch_size]
            batch = collate([tokenized[i] for i in idx], policy.tokenizer.pad_token_id)
            if first_token_from_pad:
                batch = with_leading_pad(batch, policy.tokenizer.pad_token_id)
            if tokens == "all":  # every real token is a target (the first has no context unless a pad leads)
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            batch = {k: v.to(next(policy.parameters()).device) for k, v in batch.items()}
            out[idx] = policy.sequence_nll(batch).float().cpu()
    return out


def parse_rating(text: str) -> float:
    """The first number after "Score:" (else the first number at all), clipped to [0, 10]; unparsable -> 0."""
    match = re.search(r"score\s*:\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE) or re.search(r"(-?\d+(?:\.\d+)?)", text)
    return min(max(float(match.group(1)), 0.0), 10.0) if match else 0.0


def self_ratings(policy, questions: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                 max_new_tokens: int = 16, progress: bool = True) -> torch.Tensor:
    """Self-filter (SPEC §3): the policy rates each (question, answer) 0–10, greedily. (N,)."""
    tok = policy.tokenizer
    texts = [policy.format_prompt(RATING_PROMPT.format(question=q, answer=a)) for q, a in zip(questions, answers)]
    prompts = [tok(t, add_special_tokens=not tok.chat_template)["input_ids"] for t in texts]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    ratings = []
    with policy.inference():
        for start in tqdm(range(0, len(prompts), batch_size), desc="rate", disable=not progress):
            completions = generate_batch(policy.model, tok, None, 0, prompts[start : start + batch_size], params)
            ratings += [parse_rating(finish_text(tok, c, ())[0]) for c in completions]
    return torch.tensor(ratings)


@torch.no_grad()
def with_leading_pad(batch: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch with one pad token (attention 0, no label) before every row: the first real token then has a
    position that predicts it, as under the left padding of IWSI's official loss code."""
    rows = len(batch["input_ids"])
    pad = {"input_ids": torch.full((rows, 1), pad_token_id), "attention_mask": torch.zeros(rows, 1, dtype=torch.long),
           "labels": torch.full((rows, 1), IGNORE_INDEX)}
    return {k: torch.cat([pad[k].to(v), v], 1) if k in pad else v for k, v in batch.items()}


def check_reward_model(model_dir: str) -> None:
    """A `FileNotFoundError` or `ValueError` naming `model_dir` unless it is a sequence classifier with one
    label: read from its config alone, before any generation."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model_dir))
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward model {model_dir} is not a sequence classifier (architectures: {architectures})")
    if config.num_labels != 1:
        raise ValueError(f"reward model {model_dir} has {config.num_labels} labels; one score is expected")


def reward_model_scores(model_dir: str, questions: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                        progress: bool = True) -> torch.Tensor:
    """RM-filter (SPEC §3): a sequence-classification model's single logit for `question + eos + answer`. (N,)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    sep = tok.eos_token or tok.sep_token or "\n"
    texts = [f"{q}{sep}{a}" for q, a in zip(questions, answers)]
    scores = []
    for start in tqdm(range(0, len(texts), batch_size), desc="reward", disable=not progress):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        scores.append(model(**enc).logits[:, 0].float())
    return torch.cat(scores)
