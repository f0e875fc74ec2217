"""Pure tensor maths shared by the losses, the policy and the signals. Imports torch only.

All log-probabilities are computed in at least float32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def predicting_labels(labels: Tensor) -> Tensor:
    """The positions whose next token carries a label: out[b, t] = labels[b, t + 1] != IGNORE_INDEX, False at the
    last position. (B, T) -> (B, T) bool."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return out


class _ChunkedLinearNLL(torch.autograd.Function):
    """NLL of `targets` under softmax(hidden @ weight.T), computed `chunk` rows at a time.

    Forward keeps only the log-sum-exp per row (N floats); backward recomputes each chunk's logits, so the
    peak extra memory is one (chunk, V) float32 block instead of (N, V).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        nll = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
        lse = torch.empty_like(nll)
        for s in range(0, n, chunk):
            logits = (hidden[s : s + chunk] @ weight.T).to(acc)  # (n, V)
            target_logit = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1)  # (n,)
            lse[s : s + chunk] = torch.logsumexp(logits, -1)
            nll[s : s + chunk] = lse[s : s + chunk] - target_logit
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].to(weight.dtype)  # (n, H)
            # d nll / d logits = softmax - onehot, built in place in one (n, V) block
            g = (h @ weight.T).to(lse.dtype).sub_(lse[s : s + ctx.chunk, None]).exp_()  # (n, V)
            g[torch.arange(h.shape[0], device=h.device), targets[s : s + ctx.chunk]] -= 1.0
            g = g.mul_(grad_nll[s : s + ctx.chunk, None]).to(weight.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = (g @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (g.T @ h).to(lse.dtype)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def chunked_linear_nll(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """-log softmax(hidden @ weight.T)[targets] per row. hidden (N, H), weight (V, H), targets (N,) -> (N,)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    return _ChunkedLinearNLL.apply(hidden, weight, targets, chunk)



class _ChunkedLinearEntropy(torch.autograd.Function):
    """H(softmax(hidden @ weight.T)) per row, chunk by chunk; backward recomputes each chunk's logits.
    dH/dz = -p (log p + H)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, chunk: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        for s in range(0, hidden.shape[0], chunk):
            log_p = (hidden[s : s + chunk] @ weight.T).to(acc).log_softmax(-1)  # (n, V)
            out[s : s + chunk] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(hidden, weight, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=ent.dtype) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].to(weight.dtype)
            log_p = (h @ weight.T).to(ent.dtype).log_softmax(-1)  # (n, V)
            g = -(log_p.exp() * (log_p + ent[s : s + ctx.chunk, None])) * grad_out[s : s + ctx.chunk, None]
            g = g.to(weight.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = (g @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (g.T @ h).to(ent.dtype)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None


def chunked_linear_entropy(hidden: Tensor, weight: Tensor, chunk: int = 256) -> Tensor:
    """Entropy (nats) of softmax(hidden @ weight.T) per row. hidden (N, H), weight (V, H) -> (N,)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    return _ChunkedLinearEntropy.apply(hidden, weight, chunk)

# ------------------------------------------------------------------------------------- test-time adaptation
def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dim, float32. (..., C) -> (...).
    Written as Tent's and SAR's official code write it, -(softmax * log_softmax), so that traces match theirs
    bit for bit."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """ROID's soft likelihood ratio: q = clamp(softmax, max=clip), -sum_c q log(q / (1 - q) + eps). (B, C) -> (B,).
    Gradients flow through q (zero where clipped)."""
    q = logits.float().softmax(-1).clamp(max=clip)
    return -(q * torch.log(q / (1 - q) + eps)).sum(-1)


def _minmax(x: Tensor) -> Tensor:
    """(x - min) / (max - min), and 0 everywhere when max == min (the reference divides by zero there)."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


@torch.no_grad()
def roid_weights(logits: Tensor, class_probs_ema: Tensor, temperature: float = 1 / 3) -> tuple[Tensor, Tensor]:
    """ROID's per-sample weights (no gradient). (B, C), (C,) -> weights (B,), keep (B,) bool.

    w_div = minmax(1 - cos(ema, p_i)); samples with w_div below its batch mean are excluded (weight 0);
    w_cert = minmax(-H(p_i)); w = exp(w_div * w_cert / temperature)."""
    probs = logits.float().softmax(-1)
    w_div = _minmax(1 - torch.nn.functional.cosine_similarity(class_probs_ema[None].float(), probs, dim=-1))
    keep = ~(w_div < w_div.mean())
    w_cert = _minmax(-entropy(logits))
    weights = torch.exp(w_div * w_cert / temperature) * keep
    return weights, keep


@torch.no_grad()
def update_class_probs_ema(class_probs_ema: Tensor, logits: Tensor, momentum: float = 0.9) -> Tensor:
    """ema <- momentum * ema + (1 - momentum) * mean_B softmax(logits). (C,), (B, C) -> (C,)."""
    return momentum * class_probs_ema + (1 - momentum) * logits.float().softmax(-1).mean(0)


def symmetric_cross_entropy(x: Tensor, x_ref: Tensor, alpha: float = 0.5) -> Tensor:
    """ROID's consistency loss between a view's logits `x` and the item's `x_ref`, per sample:
    -(1 - alpha) sum_c softmax(x_ref) log_softmax(x) - alpha sum_c softmax(x) log_softmax(x_ref). (B, C) -> (B,)."""
    x, x_ref = x.float(), x_ref.float()
    return (-(1 - alpha) * (x_ref.softmax(-1) * x.log_softmax(-1)).sum(-1)
            - alpha * (x.softmax(-1) * x_ref.log_softmax(-1)).sum(-1))


def prior_correction(x: Tensor, on_logits: bool = False) -> Tensor:
    """ROID's prior correction at prediction time. x (B, C): probabilities (default) or logits (`on_logits`).

    prior = mean_B p; s = max(1/B, 1/C) / max(prior); prior~ = (prior + s) / (1 + s C).
    Probabilities -> p * prior~ renormalised; logits -> logits * prior~ (what the reference does)."""
    probs = x.float().softmax(-1) if on_logits else x.float()
    b, c = probs.shape
    prior = probs.mean(0)
    smooth = max(1 / b, 1 / c) / prior.max()
    smoothed = (prior + smooth) / (1 + smooth * c)  # (C,)
    if on_logits:
        return x * smoothed
    corrected = probs * smoothed
    return corrected / corrected.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------- self-training
def ds_weight(sample_loss: Tensor, valid_mean_loss: float | Tensor, clip_like_reference: bool = False) -> Tensor:
    """IWSI's distribution-shift weight, elementwise: w' = L_v / L, w = max(w', 1/w') >= 1.

    `clip_like_reference` (the official code): w' clamped to [0, 2] and 1/w' capped at 5. A sample with L = 0
    gets +inf in both modes, so a `<= percentile` filter always drops it (the official code drops it)."""
    loss = sample_loss.float()
    ratio = valid_mean_loss / loss  # inf where L = 0
    if clip_like_reference:
        ratio = ratio.clamp(0, 2)
        weight = torch.maximum(ratio, (1 / ratio).clamp(max=5))
    else:
        weight = torch.maximum(ratio, 1 / ratio)
    return weight.masked_fill(loss == 0, float("inf"))
