"""The RAL term's gradient on the first update after a rollout is exactly zero (theta = theta_old), for both
p_old stores as the trainer configures them (algorithm.old_policy_store qk / rows, old_policy_dtype auto),
and acts on the second update.

Real pieces: the trainer's model and optimizer builders (tiny checkpoint, DDP, distributed Adam), its old
pass and policy updates on a two-prompt rollout batch. The attention term's gradient is read as the
difference of the accumulated gradients of a run with lambda_attn = 1 and one with lambda_attn = 0 (same
rollouts, same weights): the surrogate's gradient is the same in both, so the difference is the term's.
Rows stored in bf16 (the trainer's store before old_policy_dtype existed) are the control: their rounding
gives a first-update gradient that is not zero.

The same difference is the reference of the gradient-norm diagnostic (``term_grad_norms``): before the
second update its ``attn`` norm is the norm of that difference, its ``policy`` norm the norm of the
lambda_attn = 0 run's gradient, and the update after it is bit for bit the one without it.
"""

from __future__ import annotations

import pytest
import torch

from rollout_fixture import tiny_rollouts

from megatron_ral.config import load_config
from megatron_ral.testing.inference import converted_checkpoint
from megatron_ral.platform import destroy, initialize


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.config.schema import ParallelConfig

    initialize(ParallelConfig(), seed=1234)
    yield converted_checkpoint(tmp_path_factory.mktemp("first_update"), "tiny", seed=4)
    destroy()


def rollouts():
    """Two prompts x two responses; two mini-batches of two sequences (one micro-batch each): updates 0, 1."""
    return tiny_rollouts(("image", "text"), (5, 3), [[1.0, -1.0], [-0.7, 0.7]], minibatches=2, micro_batch_size=2)


def _two_updates(ckpt, overrides: list[str], diagnose: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """The accumulated gradient of each of the two updates of one rollout batch (``diagnose``: a dict that
    receives ``term_grad_norms`` measured right before the second update)."""
    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.attention.old_policy import make_old_policy_store
    from megatron_ral.rl import build as B
    from megatron_ral.rl.passes import old_pass
    from megatron_ral.rl.schedule import PassContext
    from megatron_ral.rl.trainer import old_policy_config
    from megatron_ral.rl.update import LossSettings, minibatch_normalisers, policy_update, term_grad_norms
    from megatron_ral.rl.vision import encode_prompts_vision

    hf, mc = ckpt
    cfg = load_config(None, [f"model.load={mc}", f"model.hf_path={hf}", "model.dtype=fp32", "model.layer_spec=local",
                             "algorithm.kl_beta=0", "optimizer.lr=1e-2", "optimizer.clip_grad=0", *overrides])
    chunks, model = B.build_policy(cfg, cfg.parallel, str(mc))
    optimizer, scheduler = B.build_optimizer(cfg.optimizer, chunks, torch.float32, True, 4)
    a = cfg.algorithm
    batch = rollouts()
    ctx = PassContext(model=chunks, vision=encode_prompts_vision(model, batch.prompts),
                      capture=AttentionCapture(chunks[0]), temperature=1.0)
    store = make_old_policy_store(old_policy_config(a))
    old_pass(ctx, batch, store, model.image_token_id, model.video_token_id)
    settings = LossSettings.from_config(a, cfg.generation, use_attention=a.lambda_attn > 0)
    norms = minibatch_normalisers(batch.micro_batches)
    grads = []
    for i, mbs in enumerate(batch.minibatches()):
        if diagnose is not None and i == 1:
            diagnose.update(term_grad_norms(ctx, batch, mbs, optimizer, settings, norms[mbs[0].minibatch], store))
        outcome, sums = policy_update(ctx, batch, mbs, optimizer, scheduler, settings, norms[mbs[0].minibatch], store)
        assert outcome.stepped
        grads.append({n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def _difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def without_term(ckpt):
    return _two_updates(ckpt, ["algorithm.lambda_attn=0"])


@pytest.mark.parametrize("store", ["qk", "rows"])
def test_first_update_attention_gradient_is_exactly_zero(ckpt, without_term, store):
    with_term = _two_updates(ckpt, ["algorithm.lambda_attn=1", f"algorithm.old_policy_store={store}"])
    assert _difference(with_term[0], without_term[0]) == 0.0      # update 0: theta = theta_old
    assert _difference(with_term[1], without_term[1]) > 1e-7      # update 1: the weights moved, the term acts


def test_bf16_rows_give_a_spurious_first_update_gradient(ckpt, without_term):
    bf16 = _two_updates(ckpt, ["algorithm.lambda_attn=1", "algorithm.old_policy_store=rows",
                               "algorithm.old_policy_dtype=bf16"])
    assert _difference(bf16[0], without_term[0]) > 0.0


def _norm(grads: dict, minus: dict | None = None) -> float:
    return float(torch.sqrt(sum(((g - minus[n]) if minus else g).double().pow(2).sum() for n, g in grads.items())))


def test_term_grad_norms_are_the_terms_gradients_and_leave_the_update_alone(ckpt, without_term):
    plain = _two_updates(ckpt, ["algorithm.lambda_attn=2"])
    norms: dict = {}
    diagnosed = _two_updates(ckpt, ["algorithm.lambda_attn=2"], diagnose=norms)
    assert set(norms) == {"policy", "attn"}
    assert _difference(diagnosed[1], plain[1]) == 0.0                    # the update is untouched
    policy, attn = _norm(without_term[1]), _norm(plain[1], minus=without_term[1])
    assert attn > 1e-9
    assert norms["policy"] == pytest.approx(policy, rel=1e-5)
    assert norms["attn"] == pytest.approx(attn, rel=1e-4)                # lambda_attn x the term, weight included


def test_term_grad_norms_of_grpo_is_the_policy_term_only(ckpt, without_term):
    norms: dict = {}
    _two_updates(ckpt, ["algorithm.lambda_attn=0"], diagnose=norms)
    assert set(norms) == {"policy"}
    assert norms["policy"] == pytest.approx(_norm(without_term[1]), rel=1e-5)
