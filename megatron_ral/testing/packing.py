"""Packed vs padded training passes on a tiny model: one rollout batch through each ``training.packing``.

``packing_batch`` builds a rollout batch of image, video (0.5 s per grid step), two-image and text-only
prompts of very different lengths, with G responses of very different lengths each. ``pass_results`` runs
one update pass over it (the trainer's ``run_pass`` with the trainer's ``minibatch_loss``: surrogate, k3 KL,
the attention term over captured rows) at a packing value and returns, per sequence (prompt, sample), the
log-probs, the captured attention rows over the sequence's own keys, the vocab-parallel logits at the
response positions (a forward-only schedule), the loss and the parameter gradients of this rank. The
given old / reference log-probs and p_old are functions of the sequence alone, so every packing is fed
the same numbers. ``check_packed_equals_padded`` compares them.
"""

from __future__ import annotations

import torch


def packing_batch(group_size: int = 3, seed: int = 0):
    """A RolloutBatch: 4 prompts (image, video, two images, text; 13 to ~60 tokens) x ``group_size`` responses
    of 1 to 23 tokens."""
    from megatron_ral.rl.batch import RolloutBatch
    from megatron_ral.testing.inference import prompt_from_segments

    prompts = [
        prompt_from_segments([6, ("image", (1, 4, 6)), 5], seed=seed + 1),
        prompt_from_segments([4, ("video", (4, 8, 8)), 9], seed=seed + 2, second_per_grid_ts=[0.5]),
        prompt_from_segments([3, ("image", (1, 4, 4)), 2, ("image", (1, 8, 4)), 4], seed=seed + 3),
        prompt_from_segments([13], seed=seed + 4),
    ]
    gen = torch.Generator().manual_seed(seed + 10)
    lengths = [[23, 1, 9], [4, 17, 2], [12, 6, 20], [2, 8, 15]]
    responses = [[torch.randint(0, 900, (lengths[p][g % 3] + g // 3,), generator=gen) for g in range(group_size)]
                 for p in range(len(prompts))]
    shape = (len(prompts), group_size)
    rewards = torch.rand(shape, generator=gen)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    z = torch.zeros(shape)
    return RolloutBatch(prompts=prompts, records=[None] * len(prompts), prompt_keys=list(range(len(prompts))),
                        responses=responses, texts=[[""] * group_size] * len(prompts),
                        finish_reasons=[["stop"] * group_size] * len(prompts), rewards=rewards, accuracy=z,
                        format=z, advantages=adv, zero_std=torch.zeros(len(prompts), dtype=torch.bool))


def _given(ref, prompt_len: int, response_len: int, dtype=torch.float32) -> dict:
    """Old / reference log-probs and p_old of one sequence (seeded by the sequence alone)."""
    gen = torch.Generator().manual_seed(1000 + 97 * ref.prompt + ref.sample)
    base = -torch.rand(response_len, generator=gen, dtype=torch.float64) * 3 - 2
    n = prompt_len + response_len
    logits = torch.randn(response_len, n, generator=gen, dtype=torch.float64) * 2
    before = torch.arange(n)[None, :] < (prompt_len + torch.arange(response_len))[:, None]
    p_old = torch.softmax(logits.masked_fill(~before, float("-inf")), dim=-1)
    return {"old_noise": base.to(dtype), "ref_noise": (base * 0.5).to(dtype), "p_old": p_old.to(dtype)}


def _rows_of(mb, values: torch.Tensor, b: int) -> torch.Tensor:
    return values[b, : mb.response_lengths[b]]


def pass_results(chunks, model, batch, packing: str, *, budget: int = 64, micro_batch_size: int = 4,
                 aggregation: str = "token_mean", attn_aggregation: str = "token_mean",
                 num_minibatches: int = 1) -> dict:
    """One update pass (no optimizer step) over ``batch`` at ``packing``; per-sequence results of this rank
    (log-probs, rows, logits on the last stage) and the gradients (see the module docstring)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.rl.packing import PackingSettings, plan_step_micro_batches
    from megatron_ral.rl.schedule import PassContext, _inner, model_inputs, run_pass
    from megatron_ral.rl.update import LossSettings, minibatch_loss, minibatch_normalisers
    from megatron_ral.rl.vision import encode_prompts_vision

    pad = 1000
    settings = None if packing == "none" else PackingSettings(packing, budget, model.rope_config)
    mbs = plan_step_micro_batches(batch, num_minibatches, micro_batch_size, pad, packing=settings)
    norms = minibatch_normalisers(mbs)
    vision = encode_prompts_vision(model, batch.prompts)
    capture = AttentionCapture(chunks[0])
    ctx = PassContext(model=chunks, vision=vision, capture=capture)
    loss_settings = LossSettings(kl_beta=0.04, lambda_attn=1.0, loss_aggregation=aggregation,
                                 attn_aggregation=attn_aggregation, max_new_tokens=32)
    out = {"logp": {}, "rows": {}, "logits": {}, "loss": 0.0, "micro_batches": len(mbs),
           "token_positions": sum(mb.token_positions for mb in mbs)}

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)

    def consume(mb, token_loss, result):
        logp = mb.token_logprobs(token_loss)
        given = [_given(r, p, n) for r, p, n in zip(mb.refs, mb.prompt_lengths, mb.response_lengths)]
        old = torch.zeros_like(logp)
        ref = torch.zeros_like(logp)
        rows = result.rows
        p_old = torch.zeros_like(rows)
        for b, g in enumerate(given):
            n = mb.response_lengths[b]
            old[b, :n] = logp.detach()[b, :n] + 0.1 * g["old_noise"].to(logp.dtype) + 0.05
            ref[b, :n] = logp.detach()[b, :n] + g["ref_noise"].to(logp.dtype) * 0.2
            p_old[b, :n, : g["p_old"].shape[1]] = g["p_old"].to(rows.dtype)
        loss, metrics = minibatch_loss(mb, logp, old, ref, rows, p_old, norms[mb.minibatch], loss_settings)
        for b, r in enumerate(mb.refs):
            key = (r.prompt, r.sample)
            out["logp"][key] = _rows_of(mb, logp.detach(), b).clone()
            n = mb.prompt_lengths[b] + mb.response_lengths[b]
            out["rows"][key] = _rows_of(mb, rows.detach(), b)[:, :n].clone()
        out["loss"] += float(loss.detach())
        return loss, metrics

    run_pass(ctx, mbs, consume, forward_only=False, capture_kwargs=lambda mb: {"grad": True})
    out["grads"] = {n: p.grad.detach().clone() for chunk in chunks for n, p in _inner(chunk).named_parameters()
                    if p.grad is not None}

    # logits at the response positions: a forward-only schedule without labels
    device = next(_inner(chunks[0]).language_model.parameters()).device

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        inner = _inner(chunk)
        inputs = model_inputs(mb, vision, inner.pre_process)
        index = inputs.pop("loss_index")
        for k in ("labels", "labels_at_index"):
            inputs.pop(k, None)
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        output = chunk(**inputs)

        def loss_func(logits):
            at = logits.gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))
            rows = mb.to_rows(at)
            for b, r in enumerate(mb.refs):
                out["logits"][(r.prompt, r.sample)] = _rows_of(mb, rows.detach(), b).clone()
            return logits.sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=chunks, num_microbatches=len(mbs),
            seq_length=max(mb.forward_shape[1] for mb in mbs), micro_batch_size=max(mb.forward_shape[0] for mb in mbs),
            forward_only=True)
    return out


def compare_results(ref: dict, got: dict, label: str, tol: float = 1e-5) -> dict:
    """Assert ``got`` (a packed pass) equals ``ref`` (the padded one) within ``tol``; returns the largest
    differences seen (per quantity)."""
    worst = {"logp": 0.0, "rows": 0.0, "logits": 0.0, "grad": 0.0}
    for name in ("logp", "rows", "logits"):
        assert set(ref[name]) == set(got[name]), f"{label} {name}: sequences differ"
        for key, a in ref[name].items():
            b = got[name][key]
            assert a.shape == b.shape, f"{label} {name} {key}: shape {tuple(b.shape)} != {tuple(a.shape)}"
            if a.numel():
                d = (a.double() - b.double()).abs().max().item()
                worst[name] = max(worst[name], d)
                assert d <= tol, f"{label} {name} {key}: max |diff| {d}"
    assert abs(ref["loss"] - got["loss"]) <= tol * max(1.0, abs(ref["loss"])), \
        f"{label} loss {got['loss']} vs {ref['loss']}"
    assert set(ref["grads"]) == set(got["grads"]) and ref["grads"], f"{label}: gradients of other parameters"
    for name, a in ref["grads"].items():
        scale = a.abs().max().item()
        d = (a - got["grads"][name]).abs().max().item()
        worst["grad"] = max(worst["grad"], d / max(scale, 1e-30))
        assert d <= tol * max(1.0, scale), f"{label} grad {name}: max |diff| {d} (scale {scale})"
    return worst

