"""The policy: a Hugging Face causal LM, its tokenizer, and what is adapted (LoRA, norm gains, all, none).

Design decisions:
- No Lightning in here: the three pipelines (SFT, TTA, RL) and the data side share this one class.
- `reference()` yields the frozen initial model without a copy: peft's `disable_adapter()` for LoRA, or a
  swap with the stored initial gains for `norm` (a few KB). `adapt="all"` has no copy-free reference.
- `token_nll` never materialises float32 B x T x V logits: it runs the decoder, keeps the hidden states of
  the positions that carry a label only, and applies the output head chunk by chunk (`chunked_linear_nll`),
  recomputing each chunk's logits in the backward pass instead of storing them.
- Mode rule: every no-grad pass runs inside `inference()` (eval mode, no gradient, the mode restored after).
- Scoring takes an optional `prefix_ids` shared by every row (a task's few-shot exemplars): it runs once and its
  KV cache is repeated over the batch, gradient kept (online RL's teacher-forced passes: 2.5x faster per step).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.losses.functional import (
    IGNORE_INDEX,
    chunked_linear_entropy,
    chunked_linear_nll,
    entropy,
    predicting_labels,
)
from lightning_modules.model_store import DEFAULT_MODEL, resolve_model, split_gguf
from lightning_modules.progress import phase

PLAIN_TEMPLATE = "Question: {prompt}\nAnswer: "
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """peft LoRA settings; `target_modules` is a list of module names or "all-linear"."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


def load_tokenizer(model: str):
    """The tokenizer of `model` (alias, directory, hub id or .gguf), with a pad token set."""
    from transformers import AutoTokenizer

    path, gguf_file = split_gguf(resolve_model(model))
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_context(model: str) -> int | None:
    """The model's context length in tokens (`max_position_embeddings` of its config), None when it has none."""
    if split_gguf(resolve_model(model))[1] is not None:
        return None  # a .gguf file: its config is read when the model loads
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=False)
    return getattr(config, "max_position_embeddings", None)


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the chat template with a generation prompt when the
    tokenizer has one, else `PLAIN_TEMPLATE` (the system text, if any, on the line before)."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (f"{system}\n" if system else "") + PLAIN_TEMPLATE.format(prompt=prompt)


def hash_weights(h, named: Iterable[tuple[str, Tensor]]) -> None:
    """Feed (name, tensor) pairs to a hashlib hash: names and raw bytes (any dtype, any device), a content hash."""
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def is_norm_layer(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


class Policy(nn.Module):
    """Causal LM + tokenizer + adaptation.

    Args:
        model: the embedded alias (`smollm2-135m-instruct`), a local HF directory, a hub id, or a `.gguf` file.
        dtype: weight dtype; float32 is the CPU default, bfloat16 halves memory and is faster on bf16 CPUs/GPUs.
        adapt: which parameters train: `lora` (a peft adapter), `norm` (norm-layer gains), `all`, or `none`.
        lora: LoRA settings, used when `adapt="lora"`.
        norm_skip_top_blocks: with `adapt="norm"`, leave the gains of the last N decoder blocks frozen (SAR).
        gradient_checkpointing: recompute activations in backward to save memory.
        nll_chunk_size: tokens per chunk when applying the output head in `token_nll`.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        adapt: Literal["lora", "norm", "all", "none"] = "lora",
        lora: LoraSettings | None = None,
        norm_skip_top_blocks: int = 0,
        gradient_checkpointing: bool = False,
        nll_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        lora = lora or LoraSettings()
        self.name, self.adapt, self.nll_chunk_size, self.lora = model, adapt, nll_chunk_size, lora
        self.tokenizer = load_tokenizer(model)
        path, gguf_file = split_gguf(resolve_model(model))
        with phase("model load"):
            base = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=_DTYPES[dtype],
                                                        trust_remote_code=False)
        if getattr(base.config, "quantization_config", None) is not None and gguf_file:
            del base.config.quantization_config  # GGUF weights arrive dequantised
            base.hf_quantizer = None
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tokenizer.pad_token_id
        base.requires_grad_(False)
        if gradient_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self._initial_norms: dict[str, Tensor] = {}
        self._base_fingerprint: str | None = None
        if adapt == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, config)
        else:
            self.model = base
            if adapt == "all":
                base.requires_grad_(True)
            elif adapt == "norm":
                for name, param in self._norm_gains(norm_skip_top_blocks):
                    param.requires_grad_(True)
                    self._initial_norms[name] = param.detach().clone()
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout needs train mode while training

    # ------------------------------------------------------------------ structure
    @property
    def causal_lm(self) -> nn.Module:
        """The underlying `*ForCausalLM` (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _norm_gains(self, skip_top_blocks: int) -> list[tuple[str, nn.Parameter]]:
        n_layers = self.causal_lm.config.num_hidden_layers
        skipped = {f".layers.{i}." for i in range(n_layers - skip_top_blocks, n_layers)}
        gains = []
        for mod_name, module in self.model.named_modules():
            if is_norm_layer(module) and not any(s in f".{mod_name}." for s in skipped):
                gains += [(f"{mod_name}.{n}", p) for n, p in module.named_parameters(recurse=False)]
        if not gains:
            raise ValueError(f"adapt='norm' found no norm layers in {type(self.causal_lm).__name__}")
        return gains

    def adapter_shape(self) -> dict:
        """What a checkpoint's trained tensors must match, beside the base model: the adaptation kind, the LoRA
        settings, and each trainable tensor's name and shape (the rank and the target modules show there)."""
        shape = {"adapt": self.adapt, "trainable": {n: list(p.shape) for n, p in self.named_parameters()
                                                     if p.requires_grad}}
        if self.adapt == "lora":
            shape["lora"] = {"r": self.lora.r, "alpha": self.lora.alpha, "target_modules": self.lora.target_modules}
        return shape

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def base_fingerprint(self) -> str:
        """A content hash (sha256) of the frozen weights, computed once: what identifies the base model, whatever
        its path or name (new weights copied under the same directory hash differently)."""
        if self._base_fingerprint is None:
            with phase("fingerprint"):
                h = hashlib.sha256()
                hash_weights(h, ((n, p) for n, p in self.model.named_parameters() if not p.requires_grad))
                self._base_fingerprint = h.hexdigest()
        return self._base_fingerprint

    def fingerprint(self, initial: bool = False) -> str:
        """A content hash of the weights that run: the frozen base model's (`base_fingerprint`, hashed once), the
        adaptation kind and dtype, and the trainable weights' current values, or with `initial` those of the frozen
        initial model (`reference()`: the initial norm gains; an adapter's are not used). New weights copied under
        the same path, or another adapter, give another fingerprint."""
        if initial and self.adapt == "all":
            raise ValueError("adapt='all' keeps no copy of the initial weights, so it has no initial fingerprint")
        header = f"{self.base_fingerprint()}|{self.adapt}|{next(self.parameters()).dtype}"
        h = hashlib.sha256((header + ("|initial" if initial else "")).encode())
        hash_weights(h, sorted(self._initial_norms.items()) if initial else
                     ((n, p) for n, p in sorted(self.named_parameters()) if p.requires_grad))
        return h.hexdigest()[:16]

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """The one way to run a no-grad pass (generation, scoring, rewards, evaluation, TTA's answers): eval mode
        (no dropout) and no gradient, the previous mode restored afterwards, also on an exception."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen initial model, without a copy: adapter disabled, or initial norm gains swapped in."""
        if self.adapt == "lora":
            with self.model.disable_adapter():
                yield self.model
        elif self.adapt == "norm":
            params = dict(self.model.named_parameters())
            current = {name: params[name].detach().clone() for name in self._initial_norms}
            with torch.no_grad():
                for name, initial in self._initial_norms.items():
                    params[name].copy_(initial)
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for name, value in current.items():
                        params[name].copy_(value)
        elif self.adapt == "none":
            yield self.model
        else:
            raise ValueError("adapt='all' keeps no copy of the initial weights, so it has no reference model")

    def format_prompt(self, prompt: str, system: str | None = None) -> str:
        return format_prompt(self.tokenizer, prompt, system)

    # ------------------------------------------------------------------ scoring
    def _fused_head_supported(self) -> bool:
        config = self.causal_lm.config
        head = self.causal_lm.get_output_embeddings()
        return (
            isinstance(head, nn.Linear) and head.bias is None
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logits_scaling", 1.0) == 1.0
        )

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor, prefix_ids: Sequence[int]) -> dict:
        """Model inputs for (B, T) right-padded rows that all continue `prefix_ids` (or nothing). The prefix runs
        once, batch 1, gradient kept (the adapter acts on it too), and its KV cache is repeated over the batch:
        the same values and gradients as running prefix + row for every row, for 1/B of the prefix's work."""
        if not prefix_ids:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        prefix = torch.tensor([list(prefix_ids)], device=input_ids.device)
        cache = self.causal_lm.get_decoder()(input_ids=prefix, use_cache=True).cache
        cache.batch_repeat_interleave(len(input_ids))
        n, width = len(prefix_ids), input_ids.shape[1]
        return {
            "input_ids": input_ids, "cache": cache, "use_cache": True,
            "attention_mask": torch.cat([attention_mask.new_ones(len(input_ids), n), attention_mask], 1),
            "position_ids": torch.arange(n, n + width, device=input_ids.device).expand(len(input_ids), -1),
        }

    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The logits of the token after each left-padded row (B, T) (position ids count real tokens only), with
        gradient when enabled. (B, V)."""
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          logits_to_keep=1).logits[:, -1]

    def _rows(self, input_ids: Tensor, attention_mask: Tensor, select: Tensor, prefix_ids: Sequence[int]) -> Tensor:
        """What the output head needs at the positions where `select` (B, T) is set: the decoder's final hidden
        states (N, H) when the head can be applied chunk by chunk (`_fused_head_supported`), else logits (N, V)."""
        inputs = self._inputs(input_ids, attention_mask, prefix_ids)
        if self._fused_head_supported():
            return self.causal_lm.get_decoder()(**inputs).last_hidden_state[select]
        return self.causal_lm(**inputs).logits[select]

    def token_nll(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prefix_ids: Sequence[int] = (),
                  with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token NLL (float32, natural log), aligned with `labels`: out[b, t] = -log p(labels[b, t] |
        tokens < t), 0 where `labels` is IGNORE_INDEX and at t = 0. Shapes: (B, T) -> (B, T).
        `prefix_ids`: a prefix shared by every row, which the rows continue (see `_inputs`).
        `with_entropy`: also return, from the same forward pass and without gradient, the entropy of the
        distributions that produced the labelled tokens, aligned with them (B, T)."""
        if prefix_ids and (labels[:, 0] != IGNORE_INDEX).any():
            raise ValueError("with a shared prefix, a row's first token cannot carry a label (the prefix predicts it)")
        select = predicting_labels(labels)
        targets = labels[:, 1:][select[:, :-1]]  # (N,)
        rows = self._rows(input_ids, attention_mask, select, prefix_ids)
        if self._fused_head_supported():
            weight = self.causal_lm.get_output_embeddings().weight  # (V, H)
            nll = chunked_linear_nll(rows, weight, targets, self.nll_chunk_size)  # (N,)
        else:
            nll = -rows.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        labelled = torch.roll(select, 1, dims=1)  # the labelled positions (select shifted right by one)
        out = torch.zeros(labels.shape, dtype=nll.dtype, device=nll.device).masked_scatter(labelled, nll)
        if not with_entropy:
            return out
        with torch.no_grad():
            ent = self._head_map(rows.detach(), entropy)
        return out, torch.zeros_like(out).masked_scatter(labelled, ent)

    def _head_map(self, rows: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """`fn(logits (n, V)) -> (n,)` or `(n, m)` over the rows `_rows` returned, the head applied `nll_chunk_size`
        rows at a time. (N,) or (N, m) float32."""
        if not self._fused_head_supported():
            return fn(rows).float()
        weight = self.causal_lm.get_output_embeddings().weight
        step = self.nll_chunk_size
        chunks = [fn(rows[s : s + step] @ weight.T) for s in range(0, len(rows), step)]
        return torch.cat(chunks).float() if chunks else rows.new_zeros(0, dtype=torch.float32)

    def token_entropy(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
                      prefix_ids: Sequence[int] = ()) -> Tensor:
        """Entropy (nats, float32) of the next-token distribution at each position where `mask` (B, T) is set,
        i.e. of the distribution that produced token t+1; 0 elsewhere. Chunked like `token_nll`. (B, T)."""
        rows = self._rows(input_ids, attention_mask, mask, prefix_ids)
        if self._fused_head_supported():
            ent = chunked_linear_entropy(rows, self.causal_lm.get_output_embeddings().weight, self.nll_chunk_size)
        else:
            ent = entropy(rows)
        return torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)

    @torch.no_grad()
    def token_map(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor,
                  fn: Callable[[Tensor], Tensor], prefix_ids: Sequence[int] = ()) -> Tensor:
        """`fn(logits (n, V)) -> (n,)` or `(n, m)` at each position where `mask` (B, T) is set, without gradient,
        the output head applied `nll_chunk_size` rows at a time; 0 elsewhere. (B, T) or (B, T, m) float32."""
        values = self._head_map(self._rows(input_ids, attention_mask, mask, prefix_ids), fn)
        out = torch.zeros(mask.shape + values.shape[1:], device=values.device)
        return out.masked_scatter(mask.view(mask.shape + (1,) * (values.dim() - 1)).expand_as(out), values)

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean NLL over each sample's labelled tokens: (B,). Samples with no label tokens give 0."""
        nll = self.token_nll(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B, T)
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1)  # (B,)
        return nll.sum(-1) / count

