"""Distillation losses (single process): GKD divergences and top-k + tail against float64 autograd
references written from the textbook formulas, the attention distillation term against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ral.config import ConfigError, load_config, validate
from megatron_ral.config.validate import ModelDims
from megatron_ral.distill import (
    GKD_DIVERGENCES,
    GKDConfig,
    TeacherTopK,
    attention_distill_loss,
    attn_jsd_teacher,
    attn_jsd_teacher_sums,
    gkd_divergence,
    gkd_per_token,
    gkd_teacher_targets,
    gkd_topk_divergence,
    student_bucket_logprobs,
    teacher_topk,
)

F64 = torch.float64
LN = math.log


# ----------------------------------------------------------------------------- references (float64, autograd)
def ref_divergence(log_p: torch.Tensor, log_q: torch.Tensor, name: str, beta: float = 0.5) -> torch.Tensor:
    """The textbook formulas over the last axis, from log-probs (0 ln 0 = 0 by masking)."""
    p, q = log_p.exp(), log_q.exp()
    if name == "reverse_kl":
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if name == "forward_kl":
        return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    m = beta * p + (1 - beta) * q
    kl_pm = torch.where(p > 0, p * torch.log(p / m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * torch.log(q / m), torch.zeros_like(q)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def ref_exact(student: torch.Tensor, teacher: torch.Tensor, name: str, beta: float, temperature: float):
    x = student.detach().to(F64).requires_grad_()
    v = ref_divergence(torch.log_softmax(x / temperature, -1), torch.log_softmax(teacher.to(F64) / temperature, -1),
                       name, beta)
    return v, x


def ref_topk(student: torch.Tensor, teacher: torch.Tensor, k: int, name: str, beta: float, temperature: float):
    """Buckets built by hand: the teacher's k best ids (torch.topk over the full vocabulary) and the rest."""
    x = student.detach().to(F64).requires_grad_()
    p = torch.softmax(x / temperature, -1)
    q = torch.softmax(teacher.to(F64) / temperature, -1)
    ids = torch.topk(q, k, -1).indices
    rest = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    bp = torch.cat([p.gather(-1, ids), (p * rest).sum(-1, keepdim=True)], -1)
    bq = torch.cat([q.gather(-1, ids), (q * rest).sum(-1, keepdim=True)], -1)
    return ref_divergence(torch.log(bp), torch.log(bq), name, beta), x, ids


def logits(*shape, scale=2.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def value_grad(fn, student, weights):
    x = student.detach().clone().requires_grad_()
    v = fn(x)
    (g,) = torch.autograd.grad((v * weights).sum(), x)
    return v.detach(), g


CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


# ----------------------------------------------------------------------------- exact GKD
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name,beta", CASES)
def test_exact_matches_float64_reference(name, beta, temperature):
    s, t = logits(2, 3, 37, seed=1), logits(2, 3, 37, seed=2)
    w = logits(2, 3, scale=1.0, seed=3)
    v, g = value_grad(lambda x: gkd_divergence(x, t, name, beta, temperature), s, w)
    rv, rx = ref_exact(s, t, name, beta, temperature)
    (rg,) = torch.autograd.grad((rv * w).sum(), rx)
    assert v.shape == (2, 3)
    assert (v - rv.detach()).abs().max() < 1e-13
    assert rg.abs().max() > 1e-2  # not a trivially zero gradient
    assert (g - rg).abs().max() < 1e-14


@pytest.mark.parametrize("name,beta", CASES)
def test_temperature_divides_both_sides(name, beta):
    s, t = logits(5, 16, seed=4), logits(5, 16, seed=5)
    w = torch.ones(5, dtype=F64)
    v2, g2 = value_grad(lambda x: gkd_divergence(x, t, name, beta, temperature=2.0), s, w)
    v1, g1 = value_grad(lambda x: gkd_divergence(x, t / 2.0, name, beta, temperature=1.0), s / 2.0, w)
    assert (v2 - v1).abs().max() < 1e-14
    assert (g2 - g1 / 2.0).abs().max() < 1e-14  # d/dz = d/d(z/T) / T
    raw = gkd_divergence(s, t, name, beta, temperature=1.0)
    assert (raw - v2).abs().min() > 1e-3  # and T actually changes the value


@pytest.mark.parametrize("name,beta", CASES)
def test_float32_and_bf16_inputs(name, beta):
    s, t = logits(4, 50, seed=6), logits(4, 50, seed=7)
    rv, _ = ref_exact(s, t, name, beta, 1.0)
    v32 = gkd_divergence(s.float(), t.float(), name, beta)
    assert v32.dtype == torch.float32
    assert ((v32.double() - rv.detach()).abs() / rv.detach()).max() < 1e-5
    x = s.bfloat16().requires_grad_()
    gkd_divergence(x, t.bfloat16(), name, beta).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name,beta", CASES)
def test_float32_close_distributions_keep_precision(name, beta):
    # student within 1e-3 of the teacher: values ~1e-7, where a textbook sum of O(1e-3) terms would be noise
    t = logits(8, 200, seed=8)
    s = t + 1e-3 * logits(8, 200, scale=1.0, seed=9)
    rv, _ = ref_exact(s, t, name, beta, 1.0)
    v32 = gkd_divergence(s.float(), t.float(), name, beta).double()
    rv = rv.detach()
    assert rv.min() > 1e-8
    # float32 rounding of the inputs themselves moves the reference by ~1e-4 relative: compare to the
    # float64 divergence of the float32-rounded logits
    rv32, _ = ref_exact(s.float().double(), t.float().double(), name, beta, 1.0)
    assert ((v32 - rv32.detach()).abs() / rv32.detach()).max() < 1e-3


@pytest.mark.parametrize("name,beta", CASES)
def test_teacher_equal_to_student_gives_zero_value_and_gradient(name, beta):
    s = logits(3, 4, 29, seed=10)
    for dtype in (F64, torch.float32):
        x = s.to(dtype).clone().requires_grad_()
        v = gkd_divergence(x, s.to(dtype), name, beta, temperature=0.8)
        v.sum().backward()
        assert float(v.detach().abs().max()) == 0.0 and float(x.grad.abs().max()) == 0.0


def test_padded_vocabulary_entries_are_ignored():
    # megatron pads the vocabulary: padded entries carry the dtype minimum (temperature < 1 overflows it to -inf)
    s, t = logits(3, 20, seed=11, dtype=torch.float32), logits(3, 20, seed=12, dtype=torch.float32)
    pad = torch.full((3, 4), torch.finfo(torch.float32).min)
    sp, tp = torch.cat([s, pad], -1), torch.cat([t, pad], -1)
    for name, beta in CASES:
        for temperature in (1.0, 0.5):
            x = sp.clone().requires_grad_()
            v = gkd_divergence(x, tp, name, beta, temperature)
            v.sum().backward()
            ref = gkd_divergence(s, t, name, beta, temperature)
            assert torch.isfinite(v).all() and torch.isfinite(x.grad).all()
            assert ((v - ref).abs() / ref).max() < 1e-6
            assert float(x.grad[:, 20:].abs().max()) == 0.0


def test_hand_computed_values():
    # disjoint supports: JSD_beta = h(beta) (its bound), both KLs infinite
    ninf = float("-inf")
    s = torch.tensor([[0.0, 0.0, ninf, ninf]], dtype=F64)
    t = torch.tensor([[ninf, ninf, 0.0, 0.0]], dtype=F64)
    for beta in (0.5, 0.2):
        h = -beta * LN(beta) - (1 - beta) * LN(1 - beta)
        assert float(gkd_divergence(s, t, "jsd", beta)) == pytest.approx(h, abs=1e-15)
    assert float(gkd_divergence(s, t, "reverse_kl")) == math.inf
    # p = (1/2, 1/2), q = (1/4, 3/4) from logits ln p, ln q
    p, q = (0.5, 0.5), (0.25, 0.75)
    lp, lq = torch.tensor([[LN(v) for v in p]], dtype=F64), torch.tensor([[LN(v) for v in q]], dtype=F64)
    rkl = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    fkl = 0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5)
    m = (0.375, 0.625)
    js = 0.5 * (0.5 * LN(0.5 / m[0]) + 0.5 * LN(0.5 / m[1])) + 0.5 * (0.25 * LN(0.25 / m[0]) + 0.75 * LN(0.75 / m[1]))
    assert float(gkd_divergence(lp, lq, "reverse_kl")) == pytest.approx(rkl, abs=1e-15)
    assert float(gkd_divergence(lp, lq, "forward_kl")) == pytest.approx(fkl, abs=1e-15)
    assert float(gkd_divergence(lp, lq, "jsd")) == pytest.approx(js, abs=1e-15)


def test_teacher_logits_get_no_gradient():
    s, t = logits(2, 10, seed=13), logits(2, 10, seed=14).requires_grad_()
    x = s.clone().requires_grad_()
    gkd_divergence(x, t, "reverse_kl").sum().backward()
    assert t.grad is None and x.grad is not None


# ----------------------------------------------------------------------------- top-k + tail
@pytest.mark.parametrize("name,beta", CASES)
def test_topk_with_k_equal_vocabulary_is_exact(name, beta):
    s, t = logits(3, 2, 23, seed=15), logits(3, 2, 23, seed=16)
    w = logits(3, 2, scale=1.0, seed=17)
    top = teacher_topk(t, 23, temperature=0.9)
    assert top.ids.shape == (3, 2, 23) and torch.isneginf(top.tail_logmass).all()
    ve, ge = value_grad(lambda x: gkd_divergence(x, t, name, beta, 0.9), s, w)
    vk, gk = value_grad(lambda x: gkd_topk_divergence(x, top, name, beta, 0.9), s, w)
    assert (vk - ve).abs().max() < 1e-13
    assert (gk - ge).abs().max() < 1e-13


@pytest.mark.parametrize("k", [1, 4, 11])
@pytest.mark.parametrize("name,beta", CASES)
def test_topk_matches_bucket_reference(name, beta, k):
    s, t = logits(6, 19, seed=18), logits(6, 19, seed=19)
    w = logits(6, scale=1.0, seed=20)
    rv, rx, ids = ref_topk(s, t, k, name, beta, 0.8)
    (rg,) = torch.autograd.grad((rv * w).sum(), rx)
    top = teacher_topk(t, k, temperature=0.8)
    assert torch.equal(top.ids, ids)
    vk, gk = value_grad(lambda x: gkd_topk_divergence(x, top, name, beta, 0.8), s, w)
    assert (vk - rv.detach()).abs().max() < 1e-13
    assert rg.abs().max() > 1e-3
    assert (gk - rg).abs().max() < 1e-13


def test_teacher_topk_container():
    t = logits(5, 30, seed=21)
    top = teacher_topk(t, 6, temperature=1.5)
    lq = torch.log_softmax(t / 1.5, -1)
    ref = torch.topk(lq, 6, -1)
    assert top.ids.dtype == torch.int64 and top.k == 6 and top.temperature == 1.5
    assert torch.equal(top.ids, ref.indices)
    assert (top.logprobs - ref.values).abs().max() < 1e-14
    tail = torch.log1p(-ref.values.exp().sum(-1))
    assert (top.tail_logmass - tail).abs().max() < 1e-13
    assert top.bucket_logprobs().shape == (5, 7)
    assert (top.bucket_logprobs().exp().sum(-1) - 1).abs().max() < 1e-14
    sub = top[1:3].to(dtype=torch.float32)
    assert sub.ids.dtype == torch.int64 and sub.logprobs.dtype == torch.float32 and sub.ids.shape == (2, 6)


def test_peaked_tail_mass_does_not_underflow():
    # a teacher 150 nats surer of its top id than of the rest: 1 - sum(top-k) is 0 in float32 and float64,
    # the tail's log-mass is still exact
    t = torch.zeros(2, 12)
    t[:, 0] = 150.0
    top = teacher_topk(t, 1)
    expected = LN(11) - 150.0  # ln(11 e^0 / (e^150 + 11)) to float precision
    assert torch.allclose(top.tail_logmass.double(), torch.full((2,), expected, dtype=F64), atol=1e-4)
    s = torch.zeros(2, 12)
    s[:, 0] = 140.0
    lp = student_bucket_logprobs(s, top.ids)
    assert abs(float(lp[0, 1]) - (LN(11) - 140.0)) < 1e-4
    v = gkd_topk_divergence(s, top, "reverse_kl")
    assert torch.isfinite(v).all() and (v >= 0).all()


@pytest.mark.parametrize("name,beta", CASES)
def test_topk_never_negative_and_below_exact(name, beta):
    # flat, ordinary and peaked distributions, float32 and float64, students far from and close to the teacher
    for scale in (1e-3, 1.0, 3.0, 30.0):
        for dtype in (torch.float32, F64):
            t = logits(16, 64, scale=scale, seed=22, dtype=dtype)
            for eps in (0.0, 1e-4, 1.0):
                s = t + eps * scale * logits(16, 64, scale=1.0, seed=23, dtype=dtype)
                exact = gkd_divergence(s, t, name, beta)
                prev = torch.zeros_like(exact)
                for k in (1, 2, 8, 32, 63, 64):
                    d = gkd_topk_divergence(s, teacher_topk(t, k), name, beta)
                    assert (d >= 0).all(), (scale, dtype, eps, k)
                    slack = 1e-5 * exact.abs() + (1e-6 if dtype == torch.float32 else 1e-13)
                    assert (d <= exact + slack).all(), (scale, dtype, eps, k)  # coarse-graining lowers an f-divergence
                    assert (d >= prev - slack).all(), (scale, dtype, eps, k)  # nested buckets: grows with k
                    prev = d
                if eps == 0.0:
                    assert float(exact.abs().max()) == 0.0


@pytest.mark.parametrize("name,beta", CASES)
def test_topk_teacher_equal_to_student_gives_zero_value_and_gradient(name, beta):
    s = logits(4, 26, seed=24)
    for k in (1, 5, 26):
        x = s.clone().requires_grad_()
        v = gkd_topk_divergence(x, teacher_topk(s, k, 0.7), name, beta, 0.7)
        v.sum().backward()
        assert float(v.detach().abs().max()) == 0.0
        assert float(x.grad.abs().max()) < 1e-16


def test_topk_checks():
    t = logits(2, 8, seed=25)
    with pytest.raises(ValueError, match="1 <= k <= vocabulary"):
        teacher_topk(t, 9)
    with pytest.raises(ValueError, match="temperature"):
        gkd_topk_divergence(t, teacher_topk(t, 3, temperature=1.0), temperature=0.5)


# ----------------------------------------------------------------------------- config and dispatch
def test_gkd_config_from_config_and_dispatch():
    cfg = load_config(None, ["algorithm.gkd_divergence=jsd", "algorithm.gkd_jsd_beta=0.3", "algorithm.gkd_top_k=4",
                             "generation.temperature=0.9"])
    gc = GKDConfig.from_config(cfg)
    assert gc == GKDConfig(divergence="jsd", jsd_beta=0.3, top_k=4, temperature=0.9)
    assert GKDConfig.from_config(load_config(None, ["generation.temperature=0"])).temperature == 1.0
    s, t = logits(3, 12, seed=26), logits(3, 12, seed=27)
    targets = gkd_teacher_targets(t, gc)
    assert isinstance(targets, TeacherTopK) and targets.k == 4
    assert torch.equal(gkd_per_token(s, targets, gc), gkd_topk_divergence(s, targets, "jsd", 0.3, 0.9))
    exact = GKDConfig(divergence="forward_kl", temperature=0.9)
    assert torch.equal(gkd_per_token(s, gkd_teacher_targets(t, exact), exact), gkd_divergence(s, t, "forward_kl", 0.5, 0.9))
    with pytest.raises(ValueError, match="top_k"):
        gkd_per_token(s, t, gc)
    with pytest.raises(ValueError, match="top_k"):
        gkd_per_token(s, targets, exact)
    with pytest.raises(ValueError, match="divergence"):
        GKDConfig(divergence="kl")


@pytest.mark.parametrize("override,key", [
    ("algorithm.gkd_divergence=kl", "algorithm.gkd_divergence"),
    ("algorithm.gkd_jsd_beta=1.0", "algorithm.gkd_jsd_beta"),
    ("algorithm.gkd_jsd_beta=0", "algorithm.gkd_jsd_beta"),
    ("algorithm.gkd_top_k=-1", "algorithm.gkd_top_k"),
])
def test_bad_gkd_keys_name_the_key(override, key):
    dims = ModelDims(num_layers=28, num_attention_heads=28, num_query_groups=4)
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, [override]), dims=dims)
    assert e.value.key == key and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- attention distillation
def test_attention_distill_hand_computed():
    # row 1: p = (1/2, 1/4, 1/4, 0), q = (1/4, 1/4, 1/2, 0); m = (3/8, 1/4, 3/8, 0)
    # JSD = 1/2 [1/2 ln(4/3) + 1/4 ln(2/3)] + 1/2 [1/4 ln(2/3) + 1/2 ln(4/3)] = 1/2 ln(4/3) + 1/4 ln(2/3)
    # row 2 (a padding row: all zeros on both sides) gives 0
    p = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=F64, requires_grad=True)
    q = torch.tensor([[[0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=F64, requires_grad=True)
    v = attention_distill_loss(p, q)
    expected = 0.5 * LN(4 / 3) + 0.25 * LN(2 / 3)
    assert v.shape == (1, 2)
    assert float(v[0, 0].detach()) == pytest.approx(expected, abs=1e-15) and float(v[0, 1].detach()) == 0.0
    v.sum().backward()
    # dJSD/dp(i) = 1/2 ln(2 p(i) / (p(i) + q(i))) (paper §3.4) where p(i) > 0; the teacher gets nothing
    hand = torch.tensor([0.5 * LN(2 * 0.5 / 0.75), 0.0, 0.5 * LN(2 * 0.25 / 0.75)], dtype=F64)
    assert (p.grad[0, 0, :3] - hand).abs().max() < 1e-15
    assert q.grad is None
    # the metric: mean over the valid tokens only
    valid = torch.tensor([[True, False]])
    assert attn_jsd_teacher(p, q, valid) == pytest.approx(expected, abs=1e-15)
    assert attn_jsd_teacher_sums(p, q, valid) == (pytest.approx(expected, abs=1e-15), 1.0)
    assert attn_jsd_teacher(p, q, torch.zeros(1, 2, dtype=torch.bool)) == 0.0


def test_attention_distill_zero_at_equal_rows_and_key_mask():
    g = torch.Generator().manual_seed(28)
    z = torch.randn(2, 3, 9, generator=g, dtype=F64, requires_grad=True)
    p = torch.softmax(z, -1)
    v = attention_distill_loss(p, p.detach().float())  # a bf16/fp32 store of the same rows, cast to p's dtype
    assert float(v.detach().abs().max()) < 1e-8  # the float32 store's rounding only
    z2 = torch.randn(2, 3, 9, generator=g, dtype=F64, requires_grad=True)
    p2 = torch.softmax(z2, -1)
    v2 = attention_distill_loss(p2, p2.detach().clone())
    v2.sum().backward()
    assert float(v2.detach().abs().max()) == 0.0 and float(z2.grad.abs().max()) < 1e-16
    # keys outside the mask are ignored
    q = torch.softmax(torch.randn(2, 3, 9, generator=g, dtype=F64), -1)
    keep = torch.ones(9, dtype=torch.bool)
    keep[-2:] = False
    masked = attention_distill_loss(p, q, keep)
    from megatron_ral.attention.divergence import jsd

    assert (masked - jsd(p[..., :7], q[..., :7])).abs().max() < 1e-15
    with pytest.raises(ValueError, match="differ in shape"):
        attention_distill_loss(p, q[..., :8])


def test_topk_bench_harness_small():
    from megatron_ral.bench.gkd_topk import topk_error_table

    rows = topk_error_table(vocab=64, tokens=4, ks=(1, 8, 64))
    assert {r["divergence"] for r in rows} == set(GKD_DIVERGENCES)
    for r in rows:
        assert 0.0 <= r["topk"] <= r["exact"] * (1 + 1e-12)
        if r["k"] == 64:
            assert abs(r["rel_error"]) < 1e-12 and r["grad_cos"] > 1 - 1e-12
