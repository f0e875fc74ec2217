"""WeightedNLL and the chunked output-head NLL: hand values, naive references, invariants."""

import math

import pytest
import torch

from lightning_modules.losses import WeightedNLL
from lightning_modules.losses.functional import chunked_linear_nll


def test_weighted_nll_hand_values():
    nll = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 0.0]])  # sample 0: 2 tokens, sample 1: 1 token
    mask = torch.tensor([[False, True, True], [False, True, False]])
    weight = torch.tensor([1.0, 3.0])
    # sample means 2.0 and 2.0 -> weighted mean 2.0; make them differ:
    nll[1, 1] = 4.0
    sample = WeightedNLL("sample")(nll, mask, weight).loss
    token = WeightedNLL("token")(nll, mask, weight).loss
    assert sample.item() == pytest.approx((1 * 2.0 + 3 * 4.0) / 4)  # 3.5
    assert token.item() == pytest.approx((1 * (1 + 3) + 3 * 4.0) / (1 * 2 + 3 * 1))  # 3.2


def test_weighted_nll_uniform_weights_equal_plain_means():
    torch.manual_seed(0)
    nll = torch.rand(4, 7)
    mask = torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    ones = torch.ones(4)
    token = WeightedNLL("token")(nll, mask, ones).loss
    sample = WeightedNLL("sample")(nll, mask, 2 * ones).loss  # scale of the weights does not matter
    assert token.item() == pytest.approx(nll[mask].mean().item())
    per_sample = [nll[i][mask[i]].mean().item() for i in range(4)]
    assert sample.item() == pytest.approx(sum(per_sample) / 4)


def test_zero_weight_gives_zero_gradient_and_all_zero_is_not_nan():
    nll = torch.rand(2, 5, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for reduction in ("sample", "token"):
        nll.grad = None
        WeightedNLL(reduction)(nll, mask, torch.tensor([1.0, 0.0])).loss.backward()
        assert torch.all(nll.grad[1] == 0) and torch.all(nll.grad[0] > 0)
        nll.grad = None
        loss = WeightedNLL(reduction)(nll, mask, torch.zeros(2)).loss
        loss.backward()
        assert loss.item() == 0.0 and torch.all(nll.grad == 0)


def _naive_nll(hidden, weight, targets):
    logits = hidden @ weight.T
    return -torch.stack([logits[i].log_softmax(-1)[targets[i]] for i in range(len(targets))])


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_linear_nll_matches_naive_values_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    upstream = torch.rand(7, dtype=torch.float64)
    got = chunked_linear_nll(hidden, weight, targets, chunk)
    (got * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = _naive_nll(hidden, weight, targets)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_h, hidden.grad)
    torch.testing.assert_close(g_w, weight.grad)


def test_chunked_linear_nll_gradcheck_and_frozen_head():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64)  # frozen head: no gradient asked
    targets = torch.randint(0, 6, (5,))
    assert torch.autograd.gradcheck(lambda h: chunked_linear_nll(h, weight, targets, 2), (hidden,))
    empty = chunked_linear_nll(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,) and empty.sum().item() == 0.0


def test_chunked_linear_nll_bf16_close_to_float32():
    torch.manual_seed(2)
    hidden, weight = torch.randn(9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (9,))
    got = chunked_linear_nll(hidden.bfloat16(), weight.bfloat16(), targets, 4)
    assert got.dtype == torch.float32
    # the float32 reference on the bfloat16-rounded inputs; the logits themselves are rounded to bfloat16 (8-bit
    # mantissa: at most 2^-8 relative each), which moves a log-softmax by at most twice the largest logit error
    rounded = hidden.bfloat16().float(), weight.bfloat16().float()
    bound = 2 * 2**-8 * (rounded[0] @ rounded[1].T).abs().max().item()
    assert (got - _naive_nll(*rounded, targets)).abs().max().item() <= bound
    assert math.isfinite(got.sum().item())
