"""Qwen25VLModel at TP=2, PP=2 (uneven split) and TP2xPP2 on gloo against HF transformers.

Each layout runs megatron's real pipeline schedule (get_forward_backward_func) on two presets
('tiny': GQA 2:1 untied, 3 layers; 'small': GQA 4:1 tied, 4 layers) with the same seeded weights
as an eager fp32 HF reference:
- forward only: last-stage logits (gathered over TP) of an image prompt and a video prompt
  (second_per_grid_ts != 1), one micro-batch each, equal HF's;
- forward + backward of the per-token loss: every rank's local gradient shard equals the
  HF autograd gradient mapped through the same HF -> megatron layout.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.models import (
    TOKEN_IDS,
    hf_reference_model,
    hf_state_dict,
    make_prompt,
    tiny_hf_config,
)
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

IMG, VID = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]
PRESETS = ("tiny", "small")
SEED = 21


def prompts():
    return [
        make_prompt([[5, ("image", (1, 4, 6)), 4]], seed=31),
        make_prompt([[3, ("video", (4, 8, 4)), 6]], seed=32, second_per_grid_ts=[0.5]),
    ]


def labels_of(prompt):
    return torch.roll(prompt.input_ids, -1, dims=1)


def layer_split(preset: str, pp: int):
    """Uneven split for the 3-layer preset; megatron's even split for the 4-layer one."""
    if pp == 1 or preset == "small":
        return None
    return [2, 1] if pp == 2 else None


def _run_schedule(model, batches, forward_only):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    collected = []

    def forward_step(it, m):
        b = next(it)
        labels = b.pop("labels", None)
        out = m(**b, labels=labels)

        def loss_func(output_tensor):
            if labels is None:  # logits
                if parallel_state.is_pipeline_last_stage():
                    collected.append(gather_from_tensor_model_parallel_region(output_tensor).detach().clone())
                return output_tensor.sum() * 0.0, {}
            loss = output_tensor.sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    seq = max(b["input_ids"].shape[1] for b in batches)
    ctx = torch.no_grad() if forward_only else torch.enable_grad()
    with ctx:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=seq, micro_batch_size=1, forward_only=forward_only,
        )
    return collected, losses


def _layout_worker(tp: int, pp: int, hf_grads: dict) -> dict:
    """For each preset: forward-only logits, forward+backward losses, and the max relative error of
    every local gradient shard against the HF gradients mapped through the same layout."""
    from megatron.core import parallel_state

    from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights, local_state_from_hf
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=5)
    out = {"last_stage": parallel_state.is_pipeline_last_stage()}
    for preset in PRESETS:
        cfg = tiny_hf_config(preset)
        state = hf_state_dict(cfg, seed=SEED)
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  pipeline_layer_split=layer_split(preset, pp))
        model = build_model(cfg, parallel, vision_attn_implementation="eager", dtype=torch.float32)
        load_hf_weights(model, state)
        model.eval()
        logits, _ = _run_schedule(model, [p.model_inputs() for p in prompts()], forward_only=True)

        grad_batches = []
        for p in prompts():
            b = p.model_inputs()
            b["labels"] = labels_of(p)
            grad_batches.append(b)
        _, losses = _run_schedule(model, grad_batches, forward_only=False)

        tied_across_stages = model.share_embeddings_and_output_weights and pp > 1
        expected = local_state_from_hf(model, {**state, **hf_grads[preset]})
        grad_errors = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                assert param.grad is None, name
                continue
            if tied_across_stages and name.endswith(("word_embeddings.weight", "output_layer.weight")):
                continue  # the two stage copies' gradients are summed by the optimizer's embedding sync
            exp = expected[name]
            grad_errors[name] = ((param.grad - exp).abs().max() / exp.abs().max().clamp_min(1e-6)).item()
        out[preset] = {
            "logits": logits,
            "losses": [x["loss"] for x in losses] if losses else None,
            "grad_errors": grad_errors,
            "layers": [layer.layer_number for layer in model.language_model.decoder.layers],
        }
    return out


@pytest.fixture(scope="module")
def reference():
    """HF logits, per-micro-batch losses and gradients (released naming) for each preset."""
    refs = {}
    for preset in PRESETS:
        cfg = tiny_hf_config(preset)
        state = hf_state_dict(cfg, seed=SEED)
        hf = hf_reference_model(cfg, state)
        for n, p in hf.named_parameters():
            p.requires_grad_(not n.startswith("model.visual."))
        logits, losses = [], []
        hf.zero_grad()
        batches = prompts()
        for p in batches:
            res = hf(**p.hf_inputs(IMG, VID))
            logits.append(res.logits.detach())
            loss = torch.nn.functional.cross_entropy(
                res.logits.flatten(0, 1), labels_of(p).flatten(), reduction="sum")
            losses.append(loss.detach())
            (loss / len(batches)).backward()  # megatron's schedule divides each loss by num_microbatches
        grads = {}
        for n, p in hf.named_parameters():
            if p.grad is not None:
                name = n.replace("model.language_model.", "model.")
                grads[name] = p.grad.detach().clone()
        if cfg.tie_word_embeddings:
            grads.pop("lm_head.weight", None)
        refs[preset] = {"cfg": cfg, "logits": logits, "losses": losses, "grads": grads, "state": state}
    return refs


def _check_layout(reference, tp, pp):
    hf_grads = {preset: reference[preset]["grads"] for preset in PRESETS}
    outs = run_distributed(_layout_worker, tp * pp, tp, pp, hf_grads)
    for preset in PRESETS:
        ref = reference[preset]
        layers = sorted({n for o in outs for n in o[preset]["layers"]})
        assert layers == list(range(1, ref["cfg"].text_config.num_hidden_layers + 1))
        last = [o for o in outs if o["last_stage"]]
        assert len(last) == tp
        for o in last:
            got = o[preset]["logits"]
            assert len(got) == len(ref["logits"])
            for ours, theirs in zip(got, ref["logits"]):
                scale = max(1.0, theirs.abs().max().item())
                diff = (ours - theirs).abs().max().item()
                assert diff <= 1e-4 * scale, f"{preset} tp{tp} pp{pp}: logits diff {diff} (scale {scale})"
            for ours, theirs in zip(o[preset]["losses"], ref["losses"]):
                assert abs(ours.item() - theirs.item()) <= 1e-4 * abs(theirs.item())
        checked = 0
        for o in outs:
            for name, err in o[preset]["grad_errors"].items():
                assert err <= 1e-4, f"{preset} tp{tp} pp{pp} {name}: relative grad error {err}"
                checked += 1
        assert checked >= 7 * ref["cfg"].text_config.num_hidden_layers


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_layout_matches_hf(reference, tp, pp):
    _check_layout(reference, tp, pp)


def _padded_vocab_worker():
    from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=5)
    cfg = tiny_hf_config("tiny", vocab_size=1100)
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=2), dtype=torch.float32)
    load_hf_weights(model, hf_state_dict(cfg, seed=SEED))
    prompt = prompts()[0]
    with torch.no_grad():
        shard = model(**prompt.model_inputs())
        loss = model(**prompt.model_inputs(), labels=labels_of(prompt))
    return {"shard": shard, "loss": loss}


def test_padded_vocab_under_tp2_matches_hf():
    """vocab 1100 padded to 1152 (576 columns per rank): rank 1's padded columns are masked, the
    real columns and the vocab-parallel loss equal HF's."""
    cfg = tiny_hf_config("tiny", vocab_size=1100)
    hf = hf_reference_model(cfg, hf_state_dict(cfg, seed=SEED))
    prompt = prompts()[0]
    with torch.no_grad():
        ref = hf(**prompt.hf_inputs(IMG, VID)).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), labels_of(prompt).flatten(), reduction="none")
    r0, r1 = run_distributed(_padded_vocab_worker, 2)
    assert r0["shard"].shape[-1] == r1["shard"].shape[-1] == 576
    full = torch.cat([r0["shard"], r1["shard"]], dim=-1)
    assert (full[..., 1100:] == torch.finfo(full.dtype).min).all()
    scale = max(1.0, ref.abs().max().item())
    assert (full[..., :1100] - ref).abs().max().item() <= 1e-4 * scale
    for r in (r0, r1):
        torch.testing.assert_close(r["loss"].flatten(), ref_loss, rtol=1e-4, atol=1e-4)
