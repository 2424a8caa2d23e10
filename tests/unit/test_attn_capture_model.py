"""AttentionCapture on the real model (TP=1, PP=1) from a converted tiny dist checkpoint.

References: transformers' eager attention (output_attentions=True, last layer, head mean, renormalised
over i < t) for an image and a video prompt with a response; the materialised autograd implementation
(attention_policy_reference in the same hook) for the JSD-loss gradient w.r.t. the model weights;
per-sample captures for padded (left / right) batches and for a packed THD stream.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ral.attention import OldPolicyConfig, make_old_policy_store
from megatron_ral.attention.capture import (
    AttentionCapture,
    CaptureConfig,
    packed_response_layout,
    response_layout,
)
from megatron_ral.attention.policy import ChunkConfig
from megatron_ral.testing.attention import (
    hf_attention_rows,
    model_inputs,
    padded_batch,
    ral_loss,
    random_response,
    with_response,
)
from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.inference import converted_checkpoint, load_hf_model, standard_prompts
from megatron_ral.testing.models import TOKEN_IDS
from megatron_ral.platform import destroy, initialize

RESPONSES = {"image": random_response(6, seed=1), "video": random_response(9, seed=2)}
CHUNK = ChunkConfig(max_rows=4)  # several row chunks per sample


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_ral.inference.loading import load_model

    initialize(ParallelConfig(), seed=1234)
    hf_dir, mc_dir = converted_checkpoint(tmp_path_factory.mktemp("attn_capture"), "tiny", seed=4)
    model = load_model(mc_dir, dtype=torch.float32)
    prompts = standard_prompts()
    yield {"model": model, "hf": load_hf_model(hf_dir), "prompts": prompts, "mc_dir": mc_dir}
    destroy()


def _rows(model, seq_inputs, layout, **kw):
    capture = AttentionCapture(model, CaptureConfig(chunk=CHUNK))
    with capture.capture(layout, **kw) as result:
        model(**seq_inputs)
    assert result.calls == 1
    return result


@pytest.mark.parametrize("kind", ["image", "video"])
def test_rows_equal_hf_eager_attention(setup, kind):
    model, prompt, resp = setup["model"], setup["prompts"][kind], RESPONSES[kind]
    ref = hf_attention_rows(setup["hf"], prompt, resp)
    layout = response_layout([len(prompt)], [len(resp)])
    with torch.no_grad():
        rows = _rows(model, model_inputs(with_response(prompt, resp)), layout).rows
    assert rows.dtype == torch.float32 and rows.shape == (1, len(resp), len(prompt) + len(resp))
    diff = (rows[0].double() - ref).abs().max().item()
    assert diff <= 1e-5, f"{kind}: max abs diff to HF {diff}"
    # the rows are not trivially uniform: the vision tokens get a varying share
    assert rows[0].max() > 2.0 / (len(prompt) + len(resp))


def _qkv_grads(model):
    layers = model.language_model.decoder.layers
    return {name: p.grad.detach().clone() for name, p in (
        ("last.weight", layers[-1].self_attention.linear_qkv.weight),
        ("last.bias", layers[-1].self_attention.linear_qkv.bias),
        ("first.weight", layers[0].self_attention.linear_qkv.weight),
    )}


def test_jsd_gradient_equals_materialised_reference(setup):
    """dL/dW of L = mean_t A * JSD(p_theta || p_old) through the capture, chunked custom backward vs
    the autograd reference that materialises every head; at theta = theta_old it is exactly 0."""
    model, prompt, resp = setup["model"], setup["prompts"]["video"], RESPONSES["video"]
    inputs = model_inputs(with_response(prompt, resp))
    layout = response_layout([len(prompt)], [len(resp)])
    with torch.no_grad():
        p_old = _rows(model, inputs, layout).rows
    adv = torch.tensor([-0.7])

    def grads(impl):
        model.zero_grad(set_to_none=True)
        capture = AttentionCapture(model, CaptureConfig(impl=impl, chunk=CHUNK))
        with capture.capture(layout, grad=True) as result:
            model(**inputs)
        loss = ral_loss(result.rows, p_old, layout, adv)
        loss.backward()
        return loss.detach(), _qkv_grads(model)

    loss0, at_old = grads("chunked")
    assert loss0.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in at_old.values()), "gradient at theta = theta_old must vanish"

    qkv = model.language_model.decoder.layers[-1].self_attention.linear_qkv.weight
    saved = qkv.detach().clone()
    try:
        with torch.no_grad():
            qkv.mul_(1.2)  # the weights moved after the rollout
        loss_c, ours = grads("chunked")
        loss_r, ref = grads("reference")
    finally:
        with torch.no_grad():
            qkv.copy_(saved)
        model.zero_grad(set_to_none=True)
    assert abs(loss_c.item()) > 1e-6
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-4, atol=0)  # JSD of close rows: fp32 cancellation
    for name in ours:
        scale = ref[name].abs().max().item()
        assert scale > 0, name
        err = (ours[name] - ref[name]).abs().max().item() / scale
        assert err <= 1e-5, f"{name}: relative gradient error {err}"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_per_sample(setup, padding_side):
    model, prompts = setup["model"], setup["prompts"]
    kinds = ["image", "video"]
    seqs = [with_response(prompts[k], RESPONSES[k]) for k in kinds]
    plens, rlens = [len(prompts[k]) for k in kinds], [len(RESPONSES[k]) for k in kinds]
    batch = padded_batch(seqs, padding_side, pad_id=TOKEN_IDS["<|endoftext|>"])
    layout = response_layout(plens, rlens, padding_mask=batch["attention_mask"])
    with torch.no_grad():
        rows = _rows(model, batch, layout).rows
        singles = [_rows(model, model_inputs(s), response_layout([p], [r])).rows[0]
                   for s, p, r in zip(seqs, plens, rlens)]
    keep = batch["attention_mask"].bool()
    for b, single in enumerate(singles):
        real = rows[b][:, keep[b]]
        torch.testing.assert_close(real[: rlens[b]], single, rtol=0, atol=1e-6)
        assert (rows[b][:, ~keep[b]] == 0).all()
        assert (rows[b][rlens[b]:] == 0).all()  # padding rows of the shorter response


def test_packed_stream_equals_per_sample(setup):
    """THD input ([t, heads, d]) through the installed hook: each row sees only its own sample."""
    model, prompts = setup["model"], setup["prompts"]
    seqs = [with_response(prompts[k], RESPONSES[k]) for k in ("image", "video")]
    plens = [len(prompts[k]) for k in ("image", "video")]
    rlens = [len(RESPONSES[k]) for k in ("image", "video")]
    full_q, full_k, singles = [], [], []
    with torch.no_grad():
        for s, p, r in zip(seqs, plens, rlens):
            every_position = response_layout([0], [len(s)])
            res = _rows(model, model_inputs(s), every_position, keep_qk=True)
            full_q.append(res.qk.q[:, 0])
            full_k.append(res.qk.k[:, 0])
            scale = res.qk.softmax_scale
            singles.append(res.rows[0][p:])  # rows P.. of the all-positions capture
        layout = packed_response_layout(plens, rlens, total_length=sum(map(len, seqs)) + 3)
        pad = lambda x: torch.cat([x, torch.zeros(3, *x.shape[1:])])  # noqa: E731  tail padding
        capture = AttentionCapture(model, CaptureConfig(chunk=CHUNK))
        with capture.capture(layout) as result:
            model.last_layer_core_attention().capture_hook(
                query=pad(torch.cat(full_q)), key=pad(torch.cat(full_k)), attention_mask=None,
                packed_seq_params=None, softmax_scale=scale)
    rows = result.rows[0]
    assert rows.shape == (sum(rlens), sum(map(len, seqs)) + 3)
    off, r0 = 0, 0
    for s, r, single in zip(seqs, rlens, singles):
        torch.testing.assert_close(rows[r0:r0 + r, off:off + len(s)], single, rtol=0, atol=1e-6)
        assert (rows[r0:r0 + r, :off] == 0).all() and (rows[r0:r0 + r, off + len(s):] == 0).all()
        off, r0 = off + len(s), r0 + r


def test_qk_for_old_policy_store_recomputes_rows_exactly(setup):
    model, prompt, resp = setup["model"], setup["prompts"]["image"], RESPONSES["image"]
    layout = response_layout([len(prompt)], [len(resp)])
    with torch.no_grad():
        res = _rows(model, model_inputs(with_response(prompt, resp)), layout, keep_qk=True)
    store = make_old_policy_store(OldPolicyConfig(mode="qk"), chunk=CHUNK)
    store.put("mb0", res.qk)
    assert torch.equal(store.get("mb0"), res.rows)
    assert not res.qk.q.requires_grad and res.qk.q.shape[0] == len(resp)


def test_hook_only_inside_block_and_one_forward_per_block(setup):
    model, prompt, resp = setup["model"], setup["prompts"]["image"], RESPONSES["image"]
    core = model.last_layer_core_attention()
    inputs = model_inputs(with_response(prompt, resp))
    layout = response_layout([len(prompt)], [len(resp)])
    capture = AttentionCapture(model)
    with pytest.raises(RuntimeError, match="ran twice"), torch.no_grad():
        with capture.capture(layout):
            model(**inputs)
            model(**inputs)
    assert core.capture_hook is None
    with pytest.raises(ValueError, match="layout has 2 samples"), torch.no_grad():
        with capture.capture(response_layout([len(prompt)] * 2, [len(resp)] * 2)):
            model(**inputs)
    assert core.capture_hook is None


def test_gradient_capture_refuses_core_attention_recompute(setup):
    from megatron_ral.inference.loading import load_model

    ckpt_model = load_model(setup["mc_dir"], dtype=torch.float32, recompute_granularity="selective",
                            recompute_modules=["core_attn"])
    prompt, resp = setup["prompts"]["image"], RESPONSES["image"]
    inputs = model_inputs(with_response(prompt, resp))
    layout = response_layout([len(prompt)], [len(resp)])
    capture = AttentionCapture(ckpt_model)
    ckpt_model.train()
    with pytest.raises(ValueError, match="selective core-attention recompute"):
        with capture.capture(layout):
            pass
    # no-grad captures (p_old) are fine and give the same rows as the plain model
    with torch.no_grad():
        with capture.capture(layout, grad=False) as result:
            ckpt_model(**inputs)
        plain = _rows(setup["model"], inputs, layout).rows
    torch.testing.assert_close(result.rows, plain, rtol=0, atol=1e-6)
