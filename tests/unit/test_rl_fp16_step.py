"""model.dtype fp16: one optimizer step moves the weights as the fp32 step does, within fp16 rounding.

Real pieces: the trainer's model and optimizer builders (tiny checkpoint, DDP, megatron's distributed
Adam with its dynamic loss scaler on CPU through the compatibility layer) and one policy update on a
two-prompt rollout batch. Without the loss scale reaching the schedule (``grad_scale_func``) the fp16
gradients reach the optimizer divided by the scale and the comparison fails (the control test).
"""

from __future__ import annotations

import pytest
import torch
from rollout_fixture import tiny_rollouts

from megatron_ral.config import load_config
from megatron_ral.testing.inference import converted_checkpoint
from megatron_ral.platform import destroy, initialize

LR = 1e-2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.config.schema import ParallelConfig

    initialize(ParallelConfig(), seed=1234)
    yield converted_checkpoint(tmp_path_factory.mktemp("fp16_step"), "tiny", seed=4)
    destroy()


def _one_update(ckpt, dtype: str, overrides=()):
    """(weights before, weights after, outcome) of one GRPO update in ``dtype`` (weights as float64)."""
    from megatron_ral.rl import build as B
    from megatron_ral.rl.schedule import PassContext
    from megatron_ral.rl.update import LossSettings, minibatch_normalisers, policy_update
    from megatron_ral.rl.vision import encode_prompts_vision

    hf, mc = ckpt
    cfg = load_config(None, [f"model.load={mc}", f"model.hf_path={hf}", f"model.dtype={dtype}",
                             "model.layer_spec=local", "algorithm.name=grpo", "algorithm.kl_beta=0",
                             "algorithm.updates_per_rollout=1",
                             f"optimizer.lr={LR}", "optimizer.clip_grad=0", *overrides])
    chunks, model = B.build_policy(cfg, cfg.parallel, str(mc))
    optimizer, scheduler = B.build_optimizer(cfg.optimizer, chunks, B.resolve_dtype(dtype), True, 4)
    batch = tiny_rollouts(("image", "text"), (5, 3), [[1.0, -1.0], [-0.7, 0.7]], minibatches=1, micro_batch_size=2)
    ctx = PassContext(model=chunks, vision=encode_prompts_vision(model, batch.prompts))
    settings = LossSettings.from_config(cfg.algorithm, cfg.generation, use_attention=False)
    weights = lambda: {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    before = weights()
    mbs = batch.micro_batches                             # one mini-batch of two micro-batches
    outcome, _ = policy_update(ctx, batch, mbs, optimizer, scheduler, settings,
                               minibatch_normalisers(mbs)[0], use_old_logprobs=False)
    return before, weights(), outcome


def _compare(b32, a32, b16, a16) -> tuple[float, float]:
    """(||step16 - step32|| / ||step32|| over all weights, share of weights farther from the fp32 result
    than fp16 rounding allows)."""
    diff = ref = 0.0
    outside = count = 0
    for n in b32:
        d32, d16 = a32[n] - b32[n], a16[n] - b16[n]
        diff, ref = diff + float((d16 - d32).pow(2).sum()), ref + float(d32.pow(2).sum())
        tol = 2.0**-11 * (a32[n].abs() + b32[n].abs()) + 0.05 * LR     # fp16 rounding of start and end
        outside += int(((a16[n] - a32[n]).abs() > tol).sum())
        count += d32.numel()
    return (diff / ref) ** 0.5, outside / count


def test_fp16_update_moves_the_weights_as_fp32_does(ckpt):
    b32, a32, o32 = _one_update(ckpt, "fp32")
    b16, a16, o16 = _one_update(ckpt, "fp16")
    assert o32.stepped and o16.stepped and not o16.loss_scale_skipped
    assert o16.loss_scale == 2.0**16 and o32.loss_scale == 1.0
    assert o16.grad_norm == pytest.approx(o32.grad_norm, rel=1e-3)      # measured: 4.3364 vs 4.3368
    for n in b32:
        assert torch.equal(b16[n], b32[n].half().double()), n          # the same start, rounded to fp16
        assert float((a32[n] - b32[n]).abs().max()) == pytest.approx(LR, rel=1e-3)  # Adam's first step: ~lr
    # Adam's first step is ~lr * sign(g): weights whose gradient is at fp16's noise level may step the
    # other way (measured: 0.06% of them; 4.8% of the step's norm)
    rel, outside = _compare(b32, a32, b16, a16)
    assert rel < 0.1 and outside < 0.005, (rel, outside)


def test_fp16_without_the_loss_scale_in_the_schedule_barely_moves(ckpt, monkeypatch):
    """The control: the trainer before grad_scale_func was set. The gradients reach Adam 2^16 times too
    small (grad norm ~1e-4); Adam's normalisation hides part of that, but the check above fails."""
    from megatron.core.utils import get_model_config

    from megatron_ral.rl import build as B

    build = B.build_optimizer

    def unscaled(*args, **kwargs):
        optimizer, scheduler = build(*args, **kwargs)
        for chunk in args[1]:
            get_model_config(chunk).grad_scale_func = None
        return optimizer, scheduler

    monkeypatch.setattr(B, "build_optimizer", unscaled)
    b32, a32, _ = _one_update(ckpt, "fp32")
    b16, a16, o16 = _one_update(ckpt, "fp16")
    assert o16.grad_norm < 1e-3
    rel, outside = _compare(b32, a32, b16, a16)
    assert rel > 0.3 and outside > 0.3, (rel, outside)      # measured: 0.53 and 62%


def test_fp16_overflow_is_a_loss_scale_skip(ckpt):
    b16, a16, o16 = _one_update(ckpt, "fp16", ["optimizer.initial_loss_scale=4294967296"])
    assert not o16.stepped and o16.loss_scale_skipped
    assert o16.loss_scale == 2.0**32                     # the first overflow of megatron's hysteresis of 2
    assert all(torch.equal(b16[n], a16[n]) for n in b16)
