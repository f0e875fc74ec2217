"""Pure tensor maths shared by the losses, the policy and the signals. Imports torch only.

All log-probabilities are computed in at least float32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


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
