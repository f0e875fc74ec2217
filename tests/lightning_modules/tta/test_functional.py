"""The TTA functional core and SAM: hand-computed values, naive loop references, invariants."""

import math

import pytest
import torch

from lightning_modules.losses.functional import (
    ds_weight,
    entropy,
    prior_correction,
    roid_weights,
    soft_likelihood_ratio,
    update_class_probs_ema,
)
from lightning_modules.optim.sam import SAM


def test_entropy_hand_values():
    assert entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert entropy(torch.tensor([0.0, -1e9])).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert entropy(p.log()).item() == pytest.approx(-sum(x * math.log(x) for x in p.tolist()), rel=1e-6)
    assert entropy(torch.randn(2, 3, 5)).shape == (2, 3)
    assert entropy(torch.randn(2, 5, dtype=torch.bfloat16)).dtype == torch.float32


def test_soft_likelihood_ratio_hand_value_and_clip():
    p = [0.6, 0.3, 0.1]
    want = -sum(q * math.log(q / (1 - q) + 1e-5) for q in p)
    assert soft_likelihood_ratio(torch.tensor([p]).log()).item() == pytest.approx(want, rel=1e-5)
    # a probability above the clip is clamped to 0.99 and gets no gradient
    logits = torch.tensor([[10.0, 0.0]], requires_grad=True)
    loss = soft_likelihood_ratio(logits)
    q = torch.tensor([0.99, torch.tensor([10.0, 0.0]).softmax(-1)[1].item()])
    assert loss.item() == pytest.approx(-(q * torch.log(q / (1 - q) + 1e-5)).sum().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def _naive_roid(logits, ema, tau):
    probs = logits.softmax(-1)
    cos = [float(torch.dot(ema, p) / (ema.norm() * p.norm())) for p in probs]
    div = [1 - c for c in cos]
    ent = [float(-(p * p.log()).sum()) for p in probs]
    cert = [-e for e in ent]

    def mm(v):
        lo, hi = min(v), max(v)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in v]

    div, cert = mm(div), mm(cert)
    mean_div = sum(div) / len(div)
    keep = [d >= mean_div for d in div]
    weights = [math.exp(d * c / tau) if k else 0.0 for d, c, k in zip(div, cert, keep)]
    return weights, keep


def test_roid_weights_match_naive_reference_and_hand_case():
    torch.manual_seed(0)
    for _ in range(5):
        logits, ema = torch.randn(8, 4) * 2, torch.rand(4).softmax(-1)
        weights, keep = roid_weights(logits, ema)
        want_w, want_keep = _naive_roid(logits, ema, 1 / 3)
        torch.testing.assert_close(weights, torch.tensor(want_w), rtol=1e-5, atol=1e-6)
        assert keep.tolist() == want_keep
    # hand case: two samples, uniform ema; the confident one is the diverse one -> weight exp(1 * 1 * 3)
    logits = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    weights, keep = roid_weights(logits, torch.tensor([0.5, 0.5]))
    assert keep.tolist() == [False, True]
    assert weights.tolist() == pytest.approx([0.0, math.exp(3.0)])


def test_roid_weights_degenerate_batch_and_no_grad():
    logits = torch.zeros(3, 4, requires_grad=True)  # every sample identical: max == min
    weights, keep = roid_weights(logits, torch.full((4,), 0.25))
    assert torch.isfinite(weights).all() and not weights.requires_grad
    assert keep.all() and torch.equal(weights, torch.ones(3))  # exp(0) and nothing below the mean


def test_class_probs_ema_update():
    ema = torch.tensor([0.5, 0.5])
    logits = torch.tensor([[0.0, -1e9], [0.0, -1e9]])  # all mass on class 0
    torch.testing.assert_close(update_class_probs_ema(ema, logits), torch.tensor([0.55, 0.45]))


def test_prior_correction_hand_value_and_logit_variant():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    prior = torch.tensor([0.8, 0.2])
    s = max(1 / 2, 1 / 2) / 0.8
    smoothed = (prior + s) / (1 + s * 2)
    want = probs * smoothed
    torch.testing.assert_close(prior_correction(probs), want / want.sum(-1, keepdim=True))
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2]])
    p = logits.softmax(-1).mean(0)
    s = 0.5 / p.max()
    torch.testing.assert_close(prior_correction(logits, on_logits=True), logits * (p + s) / (1 + 2 * s))


def test_ds_weight_values_and_reference_clipping():
    loss = torch.tensor([1.0, 2.0, 0.5, 0.0, 0.05])
    torch.testing.assert_close(ds_weight(loss, 1.0), torch.tensor([1.0, 2.0, 2.0, math.inf, 20.0]))
    assert (ds_weight(torch.rand(100) + 0.1, 0.7) >= 1).all()
    # reference: w' = clamp(L_v / L, 0, 2), 1 / w' capped at 5
    torch.testing.assert_close(ds_weight(loss, 1.0, clip_like_reference=True),
                               torch.tensor([1.0, 2.0, 2.0, math.inf, 2.0]))
    torch.testing.assert_close(ds_weight(torch.tensor([10.0]), 1.0, clip_like_reference=True), torch.tensor([5.0]))


# -------------------------------------------------------------------------------------------- SAM
def _quadratic(w):
    return ((w - torch.tensor([1.0, -2.0, 0.5])) ** 2 * torch.tensor([1.0, 3.0, 0.2])).sum()


def test_sam_first_step_moves_by_rho_along_the_global_gradient():
    a, b = torch.nn.Parameter(torch.tensor([0.0, 0.0])), torch.nn.Parameter(torch.tensor([1.0]))
    opt = SAM([a, b], lr=0.1, rho=0.5)
    ((a ** 2).sum() * 0 + (3 * a[0] + 4 * b[0])).backward()  # g = (3, 0) and (4,): global norm 5
    opt.first_step()
    torch.testing.assert_close(a.detach(), torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.4]))
    opt.restore()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0]))


def test_sam_with_rho_zero_equals_the_base_optimizer():
    w1 = torch.nn.Parameter(torch.zeros(3))
    w2 = torch.nn.Parameter(torch.zeros(3))
    sam, sgd = SAM([w1], rho=0.0, lr=0.1, momentum=0.9), torch.optim.SGD([w2], lr=0.1, momentum=0.9)
    for _ in range(5):
        def closure():
            sam.zero_grad()
            loss = _quadratic(w1)
            loss.backward()
            return loss
        closure()
        sam.step(closure)
        sgd.zero_grad()
        _quadratic(w2).backward()
        sgd.step()
    torch.testing.assert_close(w1.detach(), w2.detach())


def test_sam_step_uses_the_gradient_at_the_perturbed_point():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0]))
    opt = SAM([w], lr=0.1, rho=0.05)
    _quadratic(w).backward()
    g = w.grad.clone()
    e = 0.05 * g / g.norm()

    def closure():
        opt.zero_grad()
        loss = _quadratic(w)
        loss.backward()
        return loss

    opt.step(closure)
    w0 = torch.zeros(3, requires_grad=True)
    _quadratic(w0 + e).backward()
    torch.testing.assert_close(w.detach(), -0.1 * w0.grad)


def test_sam_state_dict_round_trips_momentum():
    w = torch.nn.Parameter(torch.ones(2))
    opt = SAM([w], lr=0.1, momentum=0.9)
    _quadratic(torch.cat([w, torch.zeros(1)])).backward()
    opt.first_step()
    opt.second_step()
    state = opt.state_dict()
    other = SAM([w], lr=0.5, momentum=0.9)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(other.base_optimizer.state[w]["momentum_buffer"],
                               opt.base_optimizer.state[w]["momentum_buffer"])


def test_chunked_linear_entropy_matches_naive_values_and_gradients():
    from lightning_modules.losses.functional import chunked_linear_entropy

    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.rand(7, dtype=torch.float64)
    got = chunked_linear_entropy(hidden, weight, 3)
    (got * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.stack([entropy(hidden[i] @ weight.T).double() for i in range(7)])
    log_p = (hidden @ weight.T).log_softmax(-1)
    (-(log_p.exp() * log_p).sum(-1) * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, hidden.grad)
    torch.testing.assert_close(g_w, weight.grad)


def test_policy_token_entropy_matches_full_logits(tiny_model_dir):
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir, nll_chunk_size=4).eval()
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 4:8] = True
    got = policy.token_entropy(ids, torch.ones_like(ids), mask)
    want = entropy(policy.model(input_ids=ids).logits) * mask
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
