"""JSD / KL on attention rows: hand-computed values, the paper's gradient (§3.4), finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ral.attention import aggregate_tokens, divergence, jsd, kl_divergence

LN = math.log
F64 = torch.float64


def t(*v):
    return torch.tensor(v, dtype=F64)


def test_jsd_hand_computed():
    # p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2): m = (3/8, 3/8, 1/4)
    # KL(p||m) = 2 * 1/2 ln(4/3) = ln(4/3); KL(q||m) = 2 * 1/4 ln(2/3) + 1/2 ln 2
    p, q = t(0.5, 0.5, 0.0), t(0.25, 0.25, 0.5)
    expected = 0.5 * LN(4 / 3) + 0.5 * (0.5 * LN(2 / 3) + 0.5 * LN(2))
    assert abs(float(jsd(p, q)) - expected) < 1e-15
    assert abs(float(jsd(q, p)) - expected) < 1e-15


def test_jsd_limits():
    assert float(jsd(t(1.0, 0.0), t(0.0, 1.0))) == pytest.approx(LN(2), abs=1e-15)  # disjoint: ln 2
    assert float(jsd(t(0.2, 0.8), t(0.2, 0.8))) == 0.0
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, 7, generator=g, dtype=F64) * 3, -1)
    q = torch.softmax(torch.randn(50, 7, generator=g, dtype=F64) * 3, -1)
    v = jsd(p, q)
    assert v.shape == (50,)
    assert bool((v >= 0).all()) and bool((v <= LN(2)).all())
    assert torch.allclose(v, jsd(q, p), atol=1e-15)


def test_kl_hand_computed_both_ways():
    p, q = t(0.5, 0.5), t(0.25, 0.75)
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * LN(2) + 0.5 * LN(2 / 3), abs=1e-15)
    assert float(divergence("kl_reverse", p, q)) == pytest.approx(0.25 * LN(0.5) + 0.75 * LN(1.5), abs=1e-15)
    assert float(divergence("kl", t(0.0, 1.0), t(0.5, 0.5))) == pytest.approx(LN(2), abs=1e-15)
    assert math.isinf(float(kl_divergence(t(0.5, 0.5), t(1.0, 0.0))))
    assert float(kl_divergence(t(0.5, 0.5), t(1.0, 0.0), eps=1e-30)) == pytest.approx(0.5 * LN(0.5 / 1e-30) + 0.5 * LN(0.5))
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("tv", p, q)


def test_mask_ignores_positions():
    p, q = t(0.5, 0.5, 0.3), t(0.25, 0.75, 0.9)
    mask = torch.tensor([True, True, False])
    assert float(jsd(p, q, mask)) == pytest.approx(float(jsd(p[:2], q[:2])), abs=1e-15)
    assert float(kl_divergence(p, q, mask)) == pytest.approx(float(kl_divergence(p[:2], q[:2])), abs=1e-15)


def test_jsd_gradient_matches_paper_expression():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(4, 9, generator=g, dtype=F64).add_(0.05).requires_grad_()
    q = torch.rand(4, 9, generator=g, dtype=F64).add_(0.05)
    (grad,) = torch.autograd.grad(jsd(p, q).sum(), (p,))
    paper = 0.5 * torch.log(2 * p / (p + q))
    assert torch.allclose(grad, paper.detach(), rtol=0, atol=1e-14)


def test_jsd_gradient_through_softmax_matches_paper_expression():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(3, 8, generator=g, dtype=F64).requires_grad_()
    q = torch.softmax(torch.randn(3, 8, generator=g, dtype=F64), -1)
    p = torch.softmax(e, -1)
    (grad,) = torch.autograd.grad(jsd(p, q).sum(), (e,))
    p = p.detach()
    dj_dp = 0.5 * torch.log(2 * p / (p + q))
    paper = p * (dj_dp - (p * dj_dp).sum(-1, keepdim=True))
    assert torch.allclose(grad, paper, rtol=0, atol=1e-14)


def test_gradcheck_finite_differences():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2, 5, generator=g, dtype=F64).add_(0.1).requires_grad_()
    q = torch.rand(2, 5, generator=g, dtype=F64).add_(0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: jsd(a, b), (p, q))
    assert torch.autograd.gradcheck(lambda a, b: kl_divergence(a, b), (p, q))
    assert torch.autograd.gradcheck(lambda a, b: kl_divergence(b, a), (p, q))


def test_zero_probabilities_give_finite_gradients():
    # Rows from a masked softmax contain exact zeros; no NaN/inf may reach the logits.
    g = torch.Generator().manual_seed(4)
    e = torch.randn(3, 6, generator=g, dtype=F64)
    allowed = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    e = e.masked_fill(~allowed, float("-inf")).requires_grad_()
    q = torch.softmax(torch.randn(3, 6, generator=g, dtype=F64).masked_fill(~allowed, float("-inf")), -1)
    q[0, 1] = 0.0  # a zero in q where p > 0
    q = q / q.sum(-1, keepdim=True)
    for fn in (jsd, lambda a, b: kl_divergence(b, a)):
        (grad,) = torch.autograd.grad(fn(torch.softmax(e, -1), q).sum(), (e,))
        assert torch.isfinite(grad).all()
        assert float(grad[~allowed].abs().max()) == 0.0
    # finite differences on the allowed logits only (masked ones stay -inf)
    base = e.detach()

    def f(vals):
        full = base.clone()
        full[allowed] = vals
        return jsd(torch.softmax(full, -1), q)

    assert torch.autograd.gradcheck(f, (base[allowed].clone().requires_grad_(),))


def test_aggregate_tokens_hand_computed():
    v = t(1.0, 2.0, 3.0, 4.0).view(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    w = t(2.0, 2.0, -1.0, 5.0).view(2, 2)
    assert float(aggregate_tokens(v, mask)) == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert float(aggregate_tokens(v, mask, "sum")) == pytest.approx(6.0)
    assert float(aggregate_tokens(v, mask, weights=w)) == pytest.approx((2 + 4 - 3) / 3)
    assert float(aggregate_tokens(v)) == pytest.approx(2.5)
    assert float(aggregate_tokens(v, torch.zeros(2, 2, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="token aggregation"):
        aggregate_tokens(v, mask, "seq_mean")


def test_jsd_and_kl_keep_precision_near_equal_rows_in_float32():
    """RAL acts where p_theta ~ p_old (JSD ~ 1e-4): float32 JSD stays within 1e-4 relative of float64 (the textbook form is off by ~1e-3 here), KL within 1e-3."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, 512, generator=g, dtype=torch.float64) * 2, dim=-1)
    q = torch.softmax(torch.log(p) + 0.02 * torch.randn(8, 512, generator=g, dtype=torch.float64), dim=-1)
    for fn, rtol in ((jsd, 1e-4), (kl_divergence, 1e-3)):
        exact = fn(p, q)
        approx = fn(p.float(), q.float()).double()
        assert float(exact.min()) > 1e-5
        torch.testing.assert_close(approx, exact, rtol=rtol, atol=0.0)


def _jsd_reference(p, q):
    """1/2 sum [p ln(p/m) + q ln(q/m)] in float64 with torch.xlogy (0 ln 0 = 0): an independent form."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def test_jsd_float32_stays_finite_where_one_probability_is_below_epsilon_times_the_other():
    # p/q = 2e-10: d = (p - q)/(p + q) rounds to -1 in float32 and log1p(d) to -inf; a student's row against
    # its teacher's (or a policy after a few updates) has such entries
    p = torch.tensor([[1e-10, 1 - 1e-10], [0.5, 0.5], [3e-30, 1.0]], dtype=torch.float32)
    q = torch.tensor([[0.5, 0.5], [1e-12, 1 - 1e-12], [1.0, 3e-30]], dtype=torch.float32)
    v = jsd(p, q)
    assert torch.isfinite(v).all()
    assert torch.allclose(v.double(), _jsd_reference(p, q), rtol=1e-6, atol=0)
    pg = p.clone().requires_grad_()
    (grad,) = torch.autograd.grad(jsd(pg, q).sum(), (pg,))
    ref = 0.5 * torch.log(2 * p.double() / (p.double() + q.double()))
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad.double(), ref, rtol=1e-6, atol=0)


def test_jsd_blocks_of_rows_equal_one_block(monkeypatch):
    """The fused JSD runs over blocks of rows; blocks of 8 rows give the values and both gradients of one
    block, and equal the float64 reference (broadcast q, a mask, leading dims)."""
    import importlib

    D = importlib.import_module("megatron_ral.attention.divergence")   # the package exports a function of that name

    g = torch.Generator().manual_seed(5)
    allowed = torch.rand(3, 37, 19, generator=g) < 0.8
    e = torch.randn(3, 37, 19, generator=g).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(e, -1).nan_to_num()
    q = torch.softmax(torch.randn(37, 19, generator=g), -1)           # broadcast over the leading dim
    mask = torch.rand(3, 37, 19, generator=g) < 0.9

    def run():
        pp, qq = p.clone().requires_grad_(), q.clone().requires_grad_()
        v = jsd(pp, qq, mask)
        gp, gq = torch.autograd.grad((v * torch.arange(v.numel()).view(v.shape).float()).sum(), (pp, qq))
        return v, gp, gq

    one = run()
    monkeypatch.setitem(D._JSD_BLOCK_ENTRIES, "cpu", 1)               # 8 rows per block (the minimum)
    blocked = run()
    for a, b in zip(one, blocked):
        assert torch.equal(a, b)
    assert one[0].shape == (3, 37)
    pm, qm = torch.where(mask, p, 0.0), torch.where(mask, q.expand_as(p), 0.0)
    assert torch.allclose(one[0].double(), _jsd_reference(pm, qm), rtol=1e-5, atol=1e-7)
    # float64 autograd of the reference form gives the same gradients (where p, q > 0; 0 where masked)
    pr, qr = p.double().requires_grad_(), q.double().requires_grad_()
    ref = _jsd_reference(torch.where(mask, pr, 0.0), torch.where(mask, qr.expand_as(pr), 0.0))
    gpr, gqr = torch.autograd.grad((ref * torch.arange(ref.numel()).view(ref.shape).double()).sum(), (pr, qr))
    live = mask & (p > 0)
    assert torch.allclose(one[1][live].double(), gpr[live], rtol=1e-4, atol=1e-5)
    assert float(one[1][~mask].abs().max()) == 0.0
    assert torch.allclose(one[2].double(), gqr, rtol=1e-4, atol=1e-4)
