"""``rl.update.minibatch_loss``, the trainer's composition of the loss terms, against a total composed by
hand in float64 (value and gradient w.r.t. the log-probs and the attention rows), for every policy
aggregation and both attention aggregations.

The hand total is written token by token from the formulas (rl/update.py's docstring):

    L = sum_{b, r valid} w_pol[b, r] (surr[b, r] + beta k3[b, r]) / D_pol
        + lambda sum_{b, r valid} w_attn[b, r] A_b JSD(p[b, r] || p_old[b, r]) / D_attn

with surr = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), rho = exp(logp - old), k3 = e^(ref - logp)
- (ref - logp) - 1 and the global normalisers D (tokens or sequences of the whole mini-batch, here larger
than this micro-batch's own counts). A sign flip of any term, a wrong normaliser or a dropped weight
changes the value.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.batch import SequenceRef, build_micro_batch
from megatron_ral.rl.update import LossSettings, minibatch_loss

POLICY = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ATTENTION = ("token_mean", "sum")
NORMS = {"tokens": 11.0, "sequences": 5.0}  # the global mini-batch's counts (this micro-batch: 6 tokens, 2 sequences)
KEYS = 7


def _micro_batch():
    """3 sequences: responses of 4, 2 and 3 tokens; the third has weight 0 (kept only so a rank has work)."""
    prompts = [PromptInput(torch.arange(1, 3)), PromptInput(torch.arange(1, 4))]
    responses = [[torch.arange(5, 9), torch.arange(5, 7)], [torch.arange(5, 8), torch.arange(5, 6)]]
    advantages = torch.tensor([[1.3, -0.7], [0.5, 0.0]])
    mb = build_micro_batch(0, 0, [SequenceRef(0, 0), SequenceRef(0, 1), SequenceRef(1, 0)], prompts, responses,
                           advantages, [1.0, 1.0, 0.0], pad_token_id=0)
    mb.advantages = mb.advantages.double()
    return mb


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, r = 3, 4
    old = -torch.rand(b, r, generator=g, dtype=torch.float64) * 2 - 0.1
    # log-ratios from -0.5 to 0.5: tokens on both sides of [1 - eps, 1 + eps], both inside
    shift = torch.linspace(-0.5, 0.5, b * r, dtype=torch.float64)
    logp = old + shift[torch.randperm(b * r, generator=g)].reshape(b, r)
    ref = logp + torch.randn(b, r, generator=g, dtype=torch.float64) * 0.6
    logp[2, 3] = 30.0  # padding rows may hold any finite value: they carry no weight
    # attention rows over KEYS keys with a shared support (zeros = keys not visible), normalised
    support = torch.rand(b, r, KEYS, generator=g) > 0.3
    support[..., 0] = True
    p = torch.where(support, torch.rand(b, r, KEYS, generator=g, dtype=torch.float64) + 0.05, torch.zeros(()))
    q = torch.where(support, torch.rand(b, r, KEYS, generator=g, dtype=torch.float64) + 0.05, torch.zeros(()))
    return logp, old, ref, p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _hand_total(mb, logp, old, ref, rows, p_old, s: LossSettings):
    """The composed loss written out token by token (float64 scalars, differentiable)."""
    lengths = mb.response_lengths
    weights = mb.weight.tolist()
    adv = mb.advantages.tolist()
    eps_low, eps_high = s.clip_eps, (s.clip_eps if s.clip_eps_high is None else s.clip_eps_high)
    pol = torch.zeros((), dtype=torch.float64)
    attn = torch.zeros((), dtype=torch.float64)
    for b in range(len(lengths)):
        if weights[b] == 0:
            continue
        n = lengths[b]
        for t in range(n):
            rho = torch.exp(logp[b, t] - old[b, t])
            a = adv[b]
            surr = torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - eps_low, 1 + eps_high))
            delta = ref[b, t] - logp[b, t]
            k3 = torch.exp(delta) - delta - 1
            term = surr + s.kl_beta * k3
            if s.loss_aggregation == "token_mean":
                pol = pol + term / NORMS["tokens"]
            elif s.loss_aggregation == "seq_mean_token_mean":
                pol = pol + term / n / NORMS["sequences"]
            else:  # seq_mean_token_sum_norm (Dr. GRPO)
                pol = pol + term / s.max_new_tokens / NORMS["sequences"]
            js = torch.zeros((), dtype=torch.float64)
            for i in range(KEYS):
                pi, qi = rows[b, t, i], p_old[b, t, i]
                m = (pi + qi) / 2
                if float(pi.detach()) > 0:
                    js = js + 0.5 * pi * torch.log(pi / m)
                if float(qi.detach()) > 0:
                    js = js + 0.5 * qi * torch.log(qi / m)
            d_attn = NORMS["tokens"] if s.attn_aggregation == "token_mean" else NORMS["sequences"]
            attn = attn + a * js / d_attn
    return pol + s.lambda_attn * attn


@pytest.mark.parametrize("attn_aggregation", ATTENTION)
@pytest.mark.parametrize("loss_aggregation", POLICY)
def test_minibatch_loss_equals_the_hand_composed_total(loss_aggregation, attn_aggregation):
    mb = _micro_batch()
    s = LossSettings(clip_eps=0.2, clip_eps_high=0.28, kl_beta=0.3, loss_aggregation=loss_aggregation,
                     max_new_tokens=5, lambda_attn=2.5, attn_divergence="jsd", attn_aggregation=attn_aggregation)
    logp, old, ref, rows, p_old = _inputs()
    lp = logp.clone().requires_grad_(True)
    rw = rows.clone().requires_grad_(True)
    loss, metrics = minibatch_loss(mb, lp, old, ref, rw, p_old, NORMS, s)
    loss.backward()

    lp_h = logp.clone().requires_grad_(True)
    rw_h = rows.clone().requires_grad_(True)
    hand = _hand_total(mb, lp_h, old, ref, rw_h, p_old, s)
    hand.backward()

    assert math.isfinite(float(hand)) and abs(float(hand)) > 1e-3
    assert float(loss) == pytest.approx(float(hand), rel=1e-12, abs=1e-14)
    assert float(metrics["loss/total"]) == pytest.approx(float(hand), rel=1e-12, abs=1e-14)
    valid = mb.response_mask & (mb.weight[:, None] > 0)
    # gradients: equal on the counted tokens, exactly zero on padding and on the zero-weight sequence
    torch.testing.assert_close(lp.grad, torch.where(valid, lp_h.grad, torch.zeros(())), rtol=1e-10, atol=1e-13)
    assert bool((lp.grad[~valid] == 0).all())
    torch.testing.assert_close(rw.grad, rw_h.grad, rtol=1e-10, atol=1e-13)
    assert float(rw.grad.abs().max()) > 1e-3 and float(lp.grad.abs().max()) > 1e-3
    # the terms the total is made of
    with torch.no_grad():
        s_pol = LossSettings(**{**s.__dict__, "kl_beta": 0.0, "lambda_attn": 0.0})
        s_kl = LossSettings(**{**s.__dict__, "lambda_attn": 0.0})
        pol_only = _hand_total(mb, logp, old, ref, rows, p_old, s_pol)
        kl_only = (_hand_total(mb, logp, old, ref, rows, p_old, s_kl) - pol_only) / s.kl_beta
        attn_only = (hand.detach() - _hand_total(mb, logp, old, ref, rows, p_old, s_kl)) / s.lambda_attn
    assert float(metrics["loss/policy"]) == pytest.approx(float(pol_only), rel=1e-10)
    assert float(metrics["loss/kl"]) == pytest.approx(float(kl_only), rel=1e-10)
    assert float(metrics["loss/attn"]) == pytest.approx(float(attn_only), rel=1e-10)
    assert float(metrics["loss/tokens"]) == 6.0


def test_clip_count_and_jsd_sums_by_hand():
    mb = _micro_batch()
    s = LossSettings(clip_eps=0.2, clip_eps_high=0.28, kl_beta=0.3, lambda_attn=2.5)
    logp, old, ref, rows, p_old = _inputs()
    _, metrics = minibatch_loss(mb, logp, old, ref, rows, p_old, NORMS, s)
    adv = mb.advantages.tolist()
    clipped, jsd_sum = 0, 0.0
    for b, n in enumerate(mb.response_lengths[:2]):
        for t in range(n):
            rho = math.exp(float(logp[b, t] - old[b, t]))
            # the clipped branch is active (zero gradient) when it is strictly the larger one
            clipped += (adv[b] > 0 and rho > 1.28) or (adv[b] < 0 and rho < 0.8)
            p, q = rows[b, t], p_old[b, t]
            m = (p + q) / 2
            jsd_sum += 0.5 * float(sum(x * math.log(x / y) for x, y in zip(p.tolist(), m.tolist()) if x > 0))
            jsd_sum += 0.5 * float(sum(x * math.log(x / y) for x, y in zip(q.tolist(), m.tolist()) if x > 0))
    assert clipped > 0
    assert float(metrics["loss/clip_tokens"]) == clipped
    assert float(metrics["attn/jsd_old"]) == pytest.approx(jsd_sum, rel=1e-10)
    assert float(metrics["attn/jsd_tokens"]) == 6.0


def test_terms_switched_off_leave_only_the_surrogate():
    mb = _micro_batch()
    logp, old, ref, rows, p_old = _inputs(1)
    s = LossSettings(clip_eps=0.2, kl_beta=0.0, lambda_attn=0.0)
    loss, metrics = minibatch_loss(mb, logp, old, None, None, None, NORMS, s)
    hand = _hand_total(mb, logp, old, ref, rows, p_old, s)
    assert float(loss) == pytest.approx(float(hand), rel=1e-12)
    assert "loss/kl" not in metrics and "loss/attn" not in metrics and "attn/jsd_old" not in metrics
    # rows given but lambda_attn = 0, reference given but beta = 0: still only the surrogate
    loss2, _ = minibatch_loss(mb, logp, old, ref, rows, p_old, NORMS, s)
    assert float(loss2) == float(loss)
