"""The decode loop: many samples per prompt from a causal LM, sharing every bit of work that is shared.

Task-free (token ids in, token ids and log-probs out) so that every pipeline uses it: the data side's cached
engine (`datamodules/generation.py`), evaluation, and online RL.

- the prefix shared by every prompt (a task's few-shot exemplars) is run once by the caller; each batch starts
  from a copy of its KV cache (layout [prefix | left-padded prompt | generated], positions counted over real
  tokens only, so the result equals running each prompt alone);
- each prompt is prefilled once, then its KV cache is repeated `n` times (`batch_repeat_interleave`);
- rows that finished (EOS or a stop string) leave the batch (`batch_select_indices`) once a quarter of the
  batch has finished; the KV cache has reserved room, so a step appends in place instead of re-copying it.
Greedy decoding is token-identical to `model.generate` on the same ids (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    """n samples per question; temperature 0 means greedy (then n is usually 1)."""

    n: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        """Settings that would sample nothing, or n copies of one answer, are refused when they are set."""
        if self.n < 1:
            raise ValueError(f"sampling: n (samples per question) must be at least 1, got {self.n}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling: temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"sampling: temperature 0 is greedy decoding, so n={self.n} samples would be identical "
                             "(a unanimous vote on every question, zero RL advantages): set temperature > 0 or n: 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling: max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]  # at temperature 1
    finish_reason: str  # "eos", "stop" or "length"


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for `capacity` positions: a decode step
    writes its token in place instead of `torch.cat`-ing the whole cache (which re-copies it every step)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def _reset_to(self, keys: Tensor, values: Tensor) -> None:
        b, h, t, d = keys.shape
        self._k = keys.new_empty(b, h, max(t, self.capacity), d)
        self._v = values.new_empty(b, h, max(t, self.capacity), values.shape[-1])
        self._k[:, :, :t], self._v[:, :, :t] = keys, values
        self.length = t
        self.keys, self.values = self._k[:, :, :t], self._v[:, :, :t]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._reset_to(key_states, value_states)
            return self.keys, self.values
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._reset_to(torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2))
        else:
            self._k[:, :, self.length : end], self._v[:, :, self.length : end] = key_states, value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._reset_to(self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def reserved_cache(prefix_cache, batch: int, n_layers: int, capacity: int) -> Cache:
    """A cache of `ReservedLayer`s holding `batch` copies of `prefix_cache` (or nothing)."""
    cache = Cache(layers=[ReservedLayer(capacity) for _ in range(n_layers)])
    if prefix_cache is not None:
        for layer, source in zip(cache.layers, prefix_cache.layers):
            layer.update(source.keys.expand(batch, -1, -1, -1), source.values.expand(batch, -1, -1, -1))
    return cache


@torch.no_grad()
def prefix_cache(model, prefix_ids: Sequence[int]):
    """The KV cache of a prefix shared by every prompt (batch 1), or None for an empty prefix."""
    if not prefix_ids:
        return None
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True,
                 logits_to_keep=1).cache


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits outside the smallest set of tokens whose probability reaches `top_p` become -inf. (R, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs > top_p  # the top token is always kept
    return logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def choose_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature == 0, else a sample from softmax(logits / T) restricted to the top-p set. (R,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(-1)  # (R, V)
    # inverse CDF with one uniform per row: exact, and ~20x faster on CPU than multinomial over a 49k vocabulary
    cdf = probs.double().cumsum(-1)  # (R, V)
    # the uniforms come from the generator's own device (the CPU for the seeded generators here), so that a GPU run
    # draws what a CPU run draws and a CPU generator is never handed a CUDA device
    draw_on = generator.device if generator is not None else cdf.device
    u = torch.rand(len(cdf), 1, dtype=torch.float64, generator=generator, device=draw_on).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------- the decode loop
class _StopChecker:
    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.window = 2 + max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.stop), default=0)

    def hit(self, tokens: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stop)


@torch.no_grad()
def generate_batch(
    model, tokenizer, prefix_cache, prefix_len: int, suffixes: Sequence[Sequence[int]], params: SamplingParams,
    stop: Sequence[str] = (), generator: torch.Generator | None = None,
) -> list[Completion]:
    """`params.n` completions for each suffix (row order: suffix 0 samples 0..n-1, suffix 1 ...)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    end_tokens = torch.tensor(sorted(eos_ids(model, tokenizer)), device=device)
    b, s = len(suffixes), max(len(x) for x in suffixes)
    ids = torch.full((b, s), pad, dtype=torch.long, device=device)  # (B, S) left-padded
    mask = torch.zeros((b, prefix_len + s), dtype=torch.long, device=device)  # (B, P+S)
    mask[:, :prefix_len] = 1
    for i, x in enumerate(suffixes):
        ids[i, s - len(x) :] = torch.tensor(x, device=device)
        mask[i, prefix_len + s - len(x) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, prefix_len:]  # (B, S) over real tokens only
    n_layers = model.config.get_text_config().num_hidden_layers
    cache = reserved_cache(prefix_cache if prefix_len else None, b, n_layers, prefix_len + s + params.max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1].float()  # (B, V)
    # prefill once per prompt, then n rows per prompt
    n = params.n
    cache.batch_repeat_interleave(n)
    mask, logits = mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
    next_pos = positions[:, -1:].repeat_interleave(n, 0) + 1  # (R, 1)
    rows = list(range(b * n))  # the output row of each batch row
    alive = [True] * (b * n)  # finished rows stay in the batch (outputs ignored) until compaction
    tokens: list[list[int]] = [[] for _ in range(b * n)]
    logprobs: list[list[float]] = [[] for _ in range(b * n)]
    reasons = ["length"] * (b * n)
    checker = _StopChecker(tokenizer, stop)
    for step in range(params.max_new_tokens):
        chosen = choose_tokens(logits, params.temperature, params.top_p, generator)  # (R,)
        chosen_lp = logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1)  # (R,) at temperature 1
        is_eos = torch.isin(chosen, end_tokens)
        for j, (tok, lp, eos) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), is_eos.tolist())):
            if not alive[j]:
                continue
            row = rows[j]
            tokens[row].append(tok)
            logprobs[row].append(lp)
            if eos:
                reasons[row], alive[j] = "eos", False
            elif checker.hit(tokens[row]):
                reasons[row], alive[j] = "stop", False
        n_alive = sum(alive)
        if n_alive == 0 or step == params.max_new_tokens - 1:
            break
        if n_alive <= 0.75 * len(rows):  # compact: a copy of the cache pays off once a quarter has finished
            keep = [j for j, a in enumerate(alive) if a]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            chosen, mask, next_pos = chosen[index], mask[index], next_pos[index]
            rows, alive = [rows[j] for j in keep], [True] * len(keep)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos, cache=cache,
                    use_cache=True)
        cache, logits, next_pos = out.cache, out.logits[:, -1].float(), next_pos + 1
    return [Completion(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons)]


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sample: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id}


def finish_text(tokenizer, completion: Completion, stop: Sequence[str]) -> tuple[str, Completion]:
    """The completion's text (special tokens dropped, cut before a stop string) and, for a stop, the
    tokens up to the one that completed the stop string excluded."""
    text = tokenizer.decode(completion.tokens, skip_special_tokens=True)
    if completion.finish_reason != "stop":
        return text, completion
    cut = min(i for i in (text.find(s) for s in stop) if i >= 0)
    k = len(completion.tokens) - 1
    return text[:cut], Completion(completion.tokens[:k], completion.logprobs[:k], "stop")
