"""The trainer's losses and advantages against hand-computed values (and float64 autograd)."""

import math

import pytest
import torch

from megatron_ral.rl import losses as L
from megatron_ral.rl.advantages import group_advantages


# ------------------------------------------------------------------------------------ clipped surrogate
@pytest.mark.parametrize("adv,logp,old,expected,clipped", [
    # A = +2, rho = e^0.5 = 1.6487 > 1.2: clipped branch -A * 1.2 = -2.4 is larger than -A rho = -3.297
    (2.0, 0.5, 0.0, -2.4, True),
    # A = +2, rho = e^-0.5 = 0.6065 < 0.8: max(-1.2131, -1.6) = -1.2131 (unclipped: pessimistic bound)
    (2.0, -0.5, 0.0, -2.0 * math.exp(-0.5), False),
    # A = -1, rho = 1.6487: max(1.6487, 1.2) = 1.6487 (unclipped)
    (-1.0, 0.5, 0.0, math.exp(0.5), False),
    # A = -1, rho = 0.6065: max(0.6065, 0.8) = 0.8 (clipped)
    (-1.0, -0.5, 0.0, 0.8, True),
    # rho = 1 inside the range: -A
    (3.0, 0.1, 0.1, -3.0, False),
])
def test_clipped_surrogate_values(adv, logp, old, expected, clipped):
    lp = torch.tensor([[logp]], dtype=torch.float64, requires_grad=True)
    loss, was_clipped = L.clipped_surrogate(lp, torch.tensor([[old]], dtype=torch.float64),
                                            torch.tensor([adv], dtype=torch.float64), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert bool(was_clipped.item()) == clipped
    loss.sum().backward()
    # d/dlogp of -A rho = -A rho; zero on the clipped branch
    want = 0.0 if clipped else -adv * math.exp(logp - old)
    assert lp.grad.item() == pytest.approx(want, abs=1e-12)


def test_clipped_surrogate_asymmetric_range():
    # eps_low 0.2, eps_high 0.28 (DAPO-style): A > 0, rho = 1.25 is inside [0.8, 1.28] -> unclipped
    lp = torch.tensor([[math.log(1.25)]], dtype=torch.float64)
    loss, clipped = L.clipped_surrogate(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0]), 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.25) and not clipped.item()
    loss, clipped = L.clipped_surrogate(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0]), 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.item()


# ------------------------------------------------------------------------------------ k3 KL
def test_k3_kl_values():
    logp = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([0.0, -0.5, -3.0], dtype=torch.float64)
    # d = ref - logp = [0, 0.5, -1]: e^d - d - 1 = [0, 0.148721, 0.367879]
    want = [0.0, math.exp(0.5) - 1.5, math.exp(-1.0)]
    assert L.k3_kl(logp, ref).tolist() == pytest.approx(want, rel=1e-12)
    assert (L.k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_k3_kl_clamp_bounds_the_log_ratio_by_hand():
    # d = ref - logp = [0, 30, -2, -25]; c = 20 clips d to [0, 20, -2, -20] before e^d - d - 1
    logp = torch.tensor([0.0, -30.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, 0.0, -3.0, -25.0], dtype=torch.float64)
    k3 = L.k3_kl(logp, ref, clamp=20.0)
    want = [0.0, math.exp(20.0) - 21.0, math.exp(-2.0) + 1.0, math.exp(-20.0) + 19.0]
    assert k3.tolist() == pytest.approx(want, rel=1e-12)
    k3.sum().backward()
    # d k3 / d logp = -(e^d - 1) inside the bound, 0 where d was clipped
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 1.0 - math.exp(-2.0), 0.0], abs=1e-12)
    # off (None or 0): the unbounded estimator, which overflows in float32 for a large gap
    far = (torch.tensor([-120.0]), torch.tensor([0.0]))
    assert math.isinf(L.k3_kl(*far).item()) and math.isinf(L.k3_kl(*far, clamp=0.0).item())
    assert L.k3_kl(*far, clamp=20.0).item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-6)
    # inside the bound the clamp changes nothing
    lp, rf = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.equal(L.k3_kl(lp, rf, clamp=20.0), L.k3_kl(lp, rf))


def test_k3_kl_is_unbiased_for_the_kl():
    # E_{x ~ p}[k3] = KL(p || q) for categorical p, q: check exactly by enumeration
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    k3 = L.k3_kl(p.log(), q.log())
    assert float((p * k3).sum()) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-12)


# ------------------------------------------------------------------------------------ RAL term
def _rows(theta: torch.Tensor) -> torch.Tensor:
    """[1, 1, 4] attention-policy row from logits theta [4]."""
    return torch.softmax(theta, dim=-1)[None, None]


def test_attention_loss_hand_value():
    p = torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    # m = [0.75, 0.25, 0]; KL(p||m) = 0.5 ln(2/3) + 0.5 ln 2; KL(q||m) = ln(4/3)
    jsd = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2)) + 0.5 * math.log(4 / 3)
    out = L.attention_loss(p, q, torch.tensor([-2.0], dtype=torch.float64))
    assert out.item() == pytest.approx(-2.0 * jsd, rel=1e-12)
    assert L.attention_loss(p, q, torch.tensor([1.0]), "kl").item() == pytest.approx(float("inf"))
    assert L.attention_loss(p, q, torch.tensor([1.0]), "reverse_kl").item() == pytest.approx(math.log(2), rel=1e-12)


def test_attention_loss_is_exactly_zero_with_zero_gradient_at_theta_old():
    theta = torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    p_old = _rows(theta.detach())
    loss = L.attention_loss(_rows(theta), p_old, torch.tensor([1.7], dtype=torch.float64))
    loss.sum().backward()
    assert loss.item() == 0.0
    assert torch.equal(theta.grad, torch.zeros_like(theta.grad))


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_one_update_moves_attention_toward_old_for_positive_advantage(adv):
    """A > 0: a gradient step on A * JSD(p_theta || p_old) brings p_theta closer to p_old; A < 0: farther."""
    theta_old = torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64)
    p_old = _rows(theta_old)
    theta = (theta_old + torch.tensor([0.4, 0.2, -0.5, 0.0], dtype=torch.float64)).requires_grad_(True)  # moved away
    before = L.attention_divergence(_rows(theta), p_old).item()
    L.attention_loss(_rows(theta), p_old, torch.tensor([adv], dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        after = L.attention_divergence(_rows(theta - 0.5 * theta.grad), p_old).item()
    assert (after < before) if adv > 0 else (after > before)


def test_attention_loss_gradient_matches_paper_formula():
    """dJ/dp(i) = 1/2 ln(2 p(i) / (p(i) + q(i))) (RAL paper, Sec. 3.4), checked by autograd in float64."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    L.attention_divergence(p[None], q[None]).sum().backward()
    expected = 0.5 * torch.log(2 * p.detach() / (p.detach() + q))
    torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ aggregation
def _batch():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return values, mask


def test_aggregations_by_hand():
    values, mask = _batch()
    # token_mean: (1+2+3+4+5) / 5 tokens = 3
    assert L.aggregate(values, L.token_weights(mask, "token_mean"), 5).item() == pytest.approx(3.0)
    # seq_mean_token_mean: (6/3 + 9/2) / 2 sequences = 3.25
    assert L.aggregate(values, L.token_weights(mask, "seq_mean_token_mean"), 2).item() == pytest.approx(3.25)
    # seq_mean_token_sum_norm (L_max = 4): (6/4 + 9/4) / 2 = 1.875
    w = L.token_weights(mask, "seq_mean_token_sum_norm", max_new_tokens=4)
    assert L.aggregate(values, w, 2).item() == pytest.approx(1.875)
    # sum (attention term): (6 + 9) / 2 sequences = 7.5
    assert L.aggregate(values, L.token_weights(mask, "sum"), 2).item() == pytest.approx(7.5)
    assert L.normaliser_kind("token_mean") == "tokens" and L.normaliser_kind("sum") == "sequences"


def test_aggregate_ignores_non_finite_padding_and_splits_additively():
    values, mask = _batch()
    values[1, 2] = float("nan")  # padding row: must not leak
    for mode, norm in (("token_mean", 5), ("seq_mean_token_mean", 2), ("seq_mean_token_sum_norm", 2)):
        w = L.token_weights(mask, mode, max_new_tokens=3)
        whole = L.aggregate(values, w, norm)
        parts = L.aggregate(values[:1], w[:1], norm) + L.aggregate(values[1:], w[1:], norm)
        assert math.isfinite(whole.item()) and whole.item() == pytest.approx(parts.item(), rel=1e-12)


# ------------------------------------------------------------------------------------ advantages
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    out = group_advantages(rewards, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    assert out.advantages[0].tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], rel=1e-6)
    # group 1: all equal -> exactly 0, counted
    assert out.advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0] and out.zero_std.tolist() == [False, True, False]
    # group 2: mean 0.25, std sqrt(0.75 / 3) = 0.5 -> [1.5, -0.5, -0.5, -0.5]
    assert out.advantages[2].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-6)
    assert out.num_zero_std == 1
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
