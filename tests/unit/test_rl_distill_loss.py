"""The distillation terms in ``rl.update.minibatch_loss``: L = L_RL + mu agg_pol[D_gkd] + gamma agg_attn[JSD to p_phi].

* the composed loss against a total written token by token in float64 from the formulas (GKD from
  log-softmaxes over the whole vocabulary: reverse KL, forward KL, JSD_beta; the attention JSD by its
  definition), value and gradient w.r.t. the student's logits and rows, with global normalisers larger
  than this micro-batch's counts, for each divergence and each aggregation;
* teacher = student: both terms and their gradients are exactly 0 (each divergence), on tensors here and on
  the real models (student and teacher built from one checkpoint by the trainer's builders);
* mu = gamma = 0: the loss and its gradient are the RL loss's, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.batch import SequenceRef, build_micro_batch
from megatron_ral.rl.update import DistillInputs, LossSettings, minibatch_loss

from megatron_ral.distill.gkd import GKDConfig

NORMS = {"tokens": 11.0, "sequences": 5.0}  # the global mini-batch (this micro-batch: 6 tokens, 2 sequences)
VOCAB, KEYS, T = 9, 7, 0.8
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def _micro_batch():
    """3 sequences: responses of 4, 2 and 3 tokens; the third has weight 0 (kept only so a rank has work)."""
    prompts = [PromptInput(torch.arange(1, 3)), PromptInput(torch.arange(1, 4))]
    responses = [[torch.arange(5, 9), torch.arange(5, 7)], [torch.arange(5, 8), torch.arange(5, 6)]]
    mb = build_micro_batch(0, 0, [SequenceRef(0, 0), SequenceRef(0, 1), SequenceRef(1, 0)], prompts, responses,
                           torch.tensor([[1.3, -0.7], [0.5, 0.0]]), [1.0, 1.0, 0.0], pad_token_id=0)
    mb.advantages = mb.advantages.double()
    return mb


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, r = 3, 4
    logp = -torch.rand(b, r, generator=g, dtype=torch.float64) - 0.1
    old = logp + 0.1 * torch.randn(b, r, generator=g, dtype=torch.float64)
    z_s = torch.randn(b, r, VOCAB, generator=g, dtype=torch.float64) * 2
    z_t = torch.randn(b, r, VOCAB, generator=g, dtype=torch.float64) * 2
    support = torch.rand(b, r, KEYS, generator=g) > 0.3
    support[..., 0] = True
    p = torch.where(support, torch.rand(b, r, KEYS, generator=g, dtype=torch.float64) + 0.05, torch.zeros(()))
    q = torch.where(support, torch.rand(b, r, KEYS, generator=g, dtype=torch.float64) + 0.05, torch.zeros(()))
    return logp, old, z_s, z_t, p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _settings(divergence: str = "reverse_kl", agg: str = "token_mean", attn_agg: str = "token_mean", mu: float = 0.7,
              gamma: float = 2.5) -> LossSettings:
    return LossSettings(clip_eps=0.2, kl_beta=0.0, loss_aggregation=agg, max_new_tokens=5, lambda_attn=0.0,
                        attn_aggregation=attn_agg, gkd_mu=mu, gamma_attn=gamma,
                        gkd=GKDConfig(divergence=divergence, jsd_beta=0.3, temperature=T))


def _kl(p, logp, logq):
    return (p * (logp - logq)).sum()


def _hand_distill(mb, z_s, z_t, rows, p_t, s: LossSettings):
    """mu agg_pol[D_gkd] + gamma agg_attn[JSD(rows || p_t)], token by token."""
    lengths, weights = mb.response_lengths, mb.weight.tolist()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(len(lengths)):
        if weights[b] == 0:
            continue
        n = lengths[b]
        for t in range(n):
            lp, lq = torch.log_softmax(z_s[b, t] / T, -1), torch.log_softmax(z_t[b, t] / T, -1)
            p, q = lp.exp(), lq.exp()
            if s.gkd.divergence == "reverse_kl":
                d = _kl(p, lp, lq)
            elif s.gkd.divergence == "forward_kl":
                d = _kl(q, lq, lp)
            else:
                beta = s.gkd.jsd_beta
                m = beta * p + (1 - beta) * q
                d = beta * _kl(p, lp, m.log()) + (1 - beta) * _kl(q, lq, m.log())
            pol_norm = NORMS["tokens"] if s.loss_aggregation == "token_mean" else n * NORMS["sequences"]
            total = total + s.gkd_mu * d / pol_norm
            js = torch.zeros((), dtype=torch.float64)
            for i in range(KEYS):
                pi, qi = rows[b, t, i], p_t[b, t, i]
                m = (pi + qi) / 2
                if float(pi.detach()) > 0:
                    js = js + 0.5 * pi * torch.log(pi / m)
                if float(qi) > 0:
                    js = js + 0.5 * qi * torch.log(qi / m)
            attn_norm = NORMS["tokens"] if s.attn_aggregation == "token_mean" else NORMS["sequences"]
            total = total + s.gamma_attn * js / attn_norm
    return total


@pytest.mark.parametrize("attn_agg", ("token_mean", "sum"))
@pytest.mark.parametrize("agg", ("token_mean", "seq_mean_token_mean"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_terms_equal_the_hand_composed_total(divergence, agg, attn_agg):
    mb = _micro_batch()
    s = _settings(divergence, agg, attn_agg)
    logp, old, z_s, z_t, rows, p_t = _inputs()
    base, _ = minibatch_loss(mb, logp, old, None, None, None, NORMS, s)   # the RL part alone
    zs = z_s.clone().requires_grad_(True)
    rw = rows.clone().requires_grad_(True)
    loss, metrics = minibatch_loss(mb, logp, old, None, rw, None, NORMS, s,
                                   DistillInputs(student_logits=zs, teacher=z_t, teacher_rows=p_t))
    metrics = {k: float(v) for k, v in metrics.items()}  # detached 0-d tensors, read once by the step
    (loss - base).backward()
    zs_h = z_s.clone().requires_grad_(True)
    rw_h = rows.clone().requires_grad_(True)
    hand = _hand_distill(mb, zs_h, z_t, rw_h, p_t, s)
    hand.backward()
    assert abs(float(hand)) > 1e-2
    assert float(loss - base) == pytest.approx(float(hand), rel=1e-10)
    assert metrics["loss/total"] == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(zs.grad, zs_h.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rw.grad, rw_h.grad, rtol=1e-8, atol=1e-12)
    valid = mb.response_mask & (mb.weight[:, None] > 0)
    assert not zs.grad[~valid].any() and not rw.grad[~valid].any()
    # the terms by themselves: loss/* as in the loss, distill/* summed per counted token
    only_gkd = _hand_distill(mb, z_s, z_t, rows, p_t, _settings(divergence, agg, attn_agg, gamma=0.0))
    assert metrics["loss/gkd"] == pytest.approx(float(only_gkd) / s.gkd_mu, rel=1e-10)
    assert metrics["loss/distill_attn"] == pytest.approx((float(hand) - float(only_gkd)) / s.gamma_attn, rel=1e-10)
    assert metrics["distill/gkd_tokens"] == metrics["distill/attn_tokens"] == 6.0
    token_sum = _hand_distill(mb, z_s, z_t, rows, p_t, _settings(divergence, "token_mean", "token_mean", mu=1.0,
                                                                   gamma=0.0)) * NORMS["tokens"]
    assert metrics["distill/gkd"] == pytest.approx(float(token_sum), rel=1e-10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_equal_to_student_gives_zero_terms_and_zero_gradients(divergence):
    mb = _micro_batch()
    s = _settings(divergence)
    logp, old, z_s, _, rows, _ = _inputs(1)
    zs = z_s.clone().requires_grad_(True)
    rw = rows.clone().requires_grad_(True)
    base, _ = minibatch_loss(mb, logp, old, None, None, None, NORMS, s)
    loss, metrics = minibatch_loss(mb, logp, old, None, rw, None, NORMS, s,
                                   DistillInputs(student_logits=zs, teacher=z_s.clone(), teacher_rows=rows.clone()))
    metrics = {k: float(v) for k, v in metrics.items()}
    (loss - base).backward()
    assert metrics["loss/gkd"] == 0.0 and metrics["loss/distill_attn"] == 0.0
    assert metrics["distill/gkd"] == 0.0 and metrics["distill/attn_jsd_teacher"] == 0.0
    assert not zs.grad.any() and not rw.grad.any()


def test_mu_and_gamma_zero_leave_the_rl_loss_bit_for_bit():
    mb = _micro_batch()
    logp, old, z_s, z_t, rows, p_t = _inputs(2)
    ref_logp = logp + 0.2
    s_rl = LossSettings(kl_beta=0.1, lambda_attn=1.5)
    s_off = LossSettings(kl_beta=0.1, lambda_attn=1.5, gkd_mu=0.0, gamma_attn=0.0, gkd=GKDConfig(divergence="jsd"))
    lp1, lp2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    l1, m1 = minibatch_loss(mb, lp1, old, ref_logp, rows, p_t, NORMS, s_rl)
    l2, m2 = minibatch_loss(mb, lp2, old, ref_logp, rows, p_t, NORMS, s_off,
                            DistillInputs(student_logits=z_s, teacher=z_t, teacher_rows=p_t))
    l1.backward()
    l2.backward()
    assert float(l1) == float(l2) and torch.equal(lp1.grad, lp2.grad)
    assert {k: float(v) for k, v in m1.items()} == {k: float(v) for k, v in m2.items()}
    assert math.isfinite(float(l1)) and abs(float(l1)) > 0


# ---------------------------------------------------------------------------------------- on the real models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.distill.teacher import TeacherConfig, build_teacher
    from megatron_ral.inference.loading import load_model
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.testing.inference import converted_checkpoint

    initialize(ParallelConfig(), seed=11)
    root = tmp_path_factory.mktemp("distill_same")
    hf, mc = converted_checkpoint(root, "tiny", seed=13)
    student = load_model(mc, dtype=torch.float32, backend="local").train()
    teacher = build_teacher(TeacherConfig(load=str(mc)), ParallelConfig(), hf, root / "run", dtype=torch.float32,
                            backend="local")
    yield student, teacher
    destroy()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_with_the_student_weights_gives_zero_terms_and_gradients_on_the_models(models, divergence):
    """The teacher built from the student's checkpoint by build_teacher, run by the trainer's teacher pass
    (p_phi kept in the exact "qk" store, logits at the response positions); the student's forward with a
    gradient capture and its logits: both distillation terms are 0 and every parameter gradient is 0."""
    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.rl.passes import teacher_pass
    from megatron_ral.rl.schedule import PassContext, run_pass
    from megatron_ral.rl.update import TeacherTargets
    from megatron_ral.rl.vision import encode_prompts_vision
    from megatron_ral.testing.attention import random_response
    from megatron_ral.testing.inference import standard_prompts
    from megatron_ral.testing.models import TOKEN_IDS

    student, teacher = models
    std = standard_prompts()
    prompts = [std["video"], std["image"]]
    responses = [[torch.tensor(random_response(6, seed=3))], [torch.tensor(random_response(4, seed=4))]]
    mb = build_micro_batch(0, 0, [SequenceRef(0, 0), SequenceRef(1, 0)], prompts, responses, torch.zeros(2, 1),
                           [1.0, 1.0], TOKEN_IDS["<|endoftext|>"])
    store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    gkd: dict = {}
    with teacher.active():
        tctx = PassContext(model=teacher.chunks, vision=encode_prompts_vision(teacher.model, prompts),
                           capture=teacher.capture, temperature=T)
        teacher_pass(tctx, [mb], store, gkd, lambda x: x)
    s = _settings(divergence, mu=1.0, gamma=1.0)
    targets = TeacherTargets(rows=store, gkd=gkd)
    terms = {}

    def consume(mb_, token_loss, result, logits):
        logp = mb_.token_logprobs(token_loss)
        loss, metrics = minibatch_loss(mb_, logp, logp.detach(), None, result.rows, None, NORMS, s,
                                       DistillInputs(student_logits=logits, teacher=targets.gkd[mb_.index],
                                                     teacher_rows=targets.rows.get(mb_.index)))
        base, _ = minibatch_loss(mb_, logp, logp.detach(), None, None, None, NORMS, s)
        terms.update({k: float(v) for k, v in metrics.items()})
        return loss - base, metrics

    def student_grads():
        student.zero_grad(set_to_none=True)
        run_pass(PassContext(model=[student], vision=encode_prompts_vision(student, prompts),
                             capture=AttentionCapture(student), temperature=T),
                 [mb], consume, forward_only=False, capture_kwargs=lambda _mb: {"grad": True}, return_logits=True)
        return [p.grad for p in student.parameters() if p.grad is not None]

    grads = student_grads()
    assert terms["loss/gkd"] == 0.0 and terms["loss/distill_attn"] == 0.0 and terms["distill/attn_tokens"] == 10.0
    assert grads and all(not g.any() for g in grads)
    # control: another teacher (its logits and rows moved) pulls the student, through both terms
    g = torch.Generator().manual_seed(0)
    targets.gkd[0] = gkd[0] + torch.randn(gkd[0].shape, generator=g)
    rows = store.get(0)
    moved = torch.where(rows > 0, rows * (1 + 0.5 * torch.rand(rows.shape, generator=g)), rows)
    targets.rows = make_old_policy_store(OldPolicyConfig(mode="rows", dtype="fp32"))
    targets.rows.put_rows(0, moved / moved.sum(-1, keepdim=True).clamp_min(1e-30))
    grads = student_grads()
    assert terms["loss/gkd"] > 0 and terms["loss/distill_attn"] > 0 and any(g_.any() for g_ in grads)
