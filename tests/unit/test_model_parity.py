"""Qwen25VLModel (megatron-core, local spec, TP=1 PP=1) against HF Qwen2_5_VLForConditionalGeneration.

Same seeded weights, eager fp32 HF reference; logits on a prompt with an image, a prompt with a
video (second_per_grid_ts != 1) and a left-padded mixed batch; per-token loss; the capture hook's
post-RoPE Q/K against HF's last-layer attention probabilities; vision-feature reuse; vocab padding.
"""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights
from megatron_ral.models.qwen25vl.provider import build_model
from megatron_ral.testing.models import (
    TOKEN_IDS,
    hf_reference_model,
    hf_state_dict,
    make_prompt,
    tiny_hf_config,
)
from megatron_ral.models.qwen25vl.vision import repeat_vision_embeddings
from megatron_ral.platform import destroy, initialize

IMG, VID = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]

PROMPTS = {
    "image": lambda: make_prompt([[6, ("image", (1, 4, 6)), 5]], seed=11),
    # video at 4 fps sampling: 0.5 s per temporal grid step
    "video": lambda: make_prompt([[4, ("video", (4, 8, 8)), 6]], seed=12, second_per_grid_ts=[0.5]),
    "mixed_left_padded": lambda: make_prompt(
        [[3, ("image", (1, 2, 4)), 9], [2, ("video", (2, 4, 8)), 2, ("image", (1, 4, 4)), 3]],
        seed=13, second_per_grid_ts=[1.5], padding_side="left",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=1234)
    yield
    destroy()  # leave no process group behind for later tests in the session


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request):
    cfg = tiny_hf_config(request.param)
    state = hf_state_dict(cfg, seed=3)
    hf = hf_reference_model(cfg, state)
    model = build_model(cfg, vision_attn_implementation="eager", dtype=torch.float32)
    load_hf_weights(model, state)
    return cfg, hf, model.eval()


def hf_logits(hf, prompt, **kw):
    with torch.no_grad():
        return hf(**prompt.hf_inputs(IMG, VID), **kw)


def assert_close_on_real_tokens(ours, ref, mask):
    keep = mask.bool()
    diff = (ours[keep] - ref[keep]).abs().max().item()
    scale = max(1.0, ref[keep].abs().max().item())
    assert diff <= 1e-4 * scale, f"max abs diff {diff} (logit scale {scale})"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_hf(pair, name):
    cfg, hf, model = pair
    prompt = PROMPTS[name]()
    ref = hf_logits(hf, prompt).logits
    with torch.no_grad():
        ours = model(**prompt.model_inputs())
    assert ours.shape == ref.shape
    assert_close_on_real_tokens(ours, ref, prompt.attention_mask)


def test_vision_features_matter_and_positions_matter(pair):
    """Guards against a parity test passing for the wrong reason."""
    _, _, model = pair
    prompt = PROMPTS["video"]()
    with torch.no_grad():
        base = model(**prompt.model_inputs())
        inputs = prompt.model_inputs()
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"] * 1.5
        changed = model(**inputs)
        flat = torch.arange(prompt.input_ids.shape[1]).expand(3, 1, -1)
        no_mrope = model(**prompt.model_inputs(), position_ids=flat)
    assert (changed - base).abs().max() > 1e-3
    assert (no_mrope - base).abs().max() > 1e-3


def test_per_token_loss_matches_cross_entropy_of_hf_logits(pair):
    _, hf, model = pair
    prompt = PROMPTS["image"]()
    labels = torch.roll(prompt.input_ids, -1, dims=1)
    ref_logits = hf_logits(hf, prompt).logits
    ref = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="none")
    with torch.no_grad():
        loss = model(**prompt.model_inputs(), labels=labels)
    assert loss.shape == labels.shape
    torch.testing.assert_close(loss, ref.view_as(loss), rtol=1e-4, atol=1e-4)


def test_capture_hook_sees_post_rope_qk_of_last_layer(pair):
    """softmax(q k^T * scale) from the captured tensors = HF eager last-layer attention weights."""
    cfg, hf, model = pair
    prompt = PROMPTS["mixed_left_padded"]()
    ref = hf_logits(hf, prompt, output_attentions=True).attentions[-1]  # (B, heads, S, S)
    seen = {}

    def hook(query, key, attention_mask, packed_seq_params, softmax_scale):
        seen.update(q=query.detach(), k=key.detach(), mask=attention_mask, scale=softmax_scale)

    core = model.last_layer_core_attention()
    assert core is not None and type(core).__name__.startswith("Capture")
    core.capture_hook = hook
    try:
        with torch.no_grad():
            model(**prompt.model_inputs())
    finally:
        core.capture_hook = None
    q, k = seen["q"], seen["k"]  # [s, b, heads, d], [s, b, kv_heads, d]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * seen["scale"]
    seq = q.shape[0]
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    keep = prompt.attention_mask.bool()
    masked = causal[None, None] | ~keep[:, None, None, :]
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    for b in range(q.shape[1]):
        rows = keep[b]
        torch.testing.assert_close(probs[b][:, rows][:, :, rows], ref[b][:, rows][:, :, rows], rtol=1e-4, atol=1e-5)


def test_vision_features_encoded_once_reused_for_group(pair):
    """encode_vision on B prompts + repeat for G responses = encoding the repeated batch."""
    _, _, model = pair
    prompt = PROMPTS["mixed_left_padded"]()
    group = 3
    feats = model.encode_vision(prompt.pixel_values, prompt.image_grid_thw,
                                prompt.pixel_values_videos, prompt.video_grid_thw)
    rep = repeat_vision_embeddings(feats, prompt.input_ids, IMG, VID, group)
    ids = prompt.input_ids.repeat_interleave(group, 0)
    mask = prompt.attention_mask.repeat_interleave(group, 0)

    def rep_items(pixels, grids, item_rows):
        """Pixels and grids of the repeated batch; item_rows[j] = row holding item j."""
        px = torch.split(pixels, grids.prod(-1).tolist())
        order = [j for r in range(prompt.input_ids.shape[0]) for _ in range(group)
                 for j, row in enumerate(item_rows) if row == r]
        return torch.cat([px[j] for j in order]), grids[order]

    pv, ig = rep_items(prompt.pixel_values, prompt.image_grid_thw, item_rows=[0, 1])
    pvv, vg = rep_items(prompt.pixel_values_videos, prompt.video_grid_thw, item_rows=[1])
    secs = prompt.second_per_grid_ts.repeat(group)  # one video, in row 1
    with torch.no_grad():
        reused = model(ids, attention_mask=mask, image_grid_thw=ig, video_grid_thw=vg,
                       second_per_grid_ts=secs, vision_embeddings=rep)
        direct = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=ig,
                       pixel_values_videos=pvv, video_grid_thw=vg, second_per_grid_ts=secs)
    assert_close_on_real_tokens(reused, direct, mask)


def test_padded_vocab_is_masked_and_real_logits_match():
    cfg = tiny_hf_config("tiny", vocab_size=1100)
    state = hf_state_dict(cfg, seed=5)
    hf = hf_reference_model(cfg, state)
    model = build_model(cfg, vision_attn_implementation="eager", dtype=torch.float32).eval()
    load_hf_weights(model, state)
    assert model.vocab_size == 1100 and model.padded_vocab_size == 1152
    prompt = PROMPTS["image"]()
    ref = hf_logits(hf, prompt).logits
    with torch.no_grad():
        ours = model(**prompt.model_inputs())
        loss = model(**prompt.model_inputs(), labels=prompt.input_ids)
    assert ours.shape[-1] == 1152
    assert_close_on_real_tokens(ours[..., :1100], ref, prompt.attention_mask)
    assert (ours[..., 1100:] == torch.finfo(ours.dtype).min).all()
    ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), prompt.input_ids.flatten(), reduction="none")
    torch.testing.assert_close(loss.flatten(), ref_loss, rtol=1e-4, atol=1e-4)


def test_megatron_mrope_equals_hf_rotary_for_released_sections():
    """megatron's MultimodalRotaryEmbedding + apply_rotary_pos_emb = HF's Qwen2.5-VL rotary, for the
    released head_dim 128 / sections [16, 24, 24] and distinct temporal/height/width rows."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb as hf_apply

    from megatron_ral.models.qwen25vl.provider import transformer_config_from_hf

    text = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                num_hidden_layers=1, vocab_size=256,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    hf_cfg = Qwen2_5_VLConfig(text_config=text, vision_config={"out_hidden_size": 256})
    seq, batch, heads, dim = 40, 2, 2, 128
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5000, (3, batch, seq), generator=gen)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64).float()
    hf_rope = Qwen2_5_VLRotaryEmbedding(hf_cfg.text_config)
    cos, sin = hf_rope(q, pos)
    ref, _ = hf_apply(q, q, cos, sin)

    cfg = transformer_config_from_hf(hf_cfg)
    emb = MultimodalRotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=1e6)(pos, [16, 24, 24])
    ours = apply_rotary_pos_emb(q.permute(2, 0, 1, 3), emb, cfg)  # megatron layout [s, b, h, d]
    torch.testing.assert_close(ours.permute(1, 2, 0, 3), ref, rtol=1e-5, atol=1e-5)
    swapped = apply_rotary_pos_emb(q.permute(2, 0, 1, 3),
                                   MultimodalRotaryEmbedding(dim, 1.0, rotary_base=1e6)(pos[[0, 2, 1]], [16, 24, 24]), cfg)
    assert (swapped.permute(1, 2, 0, 3) - ref).abs().max() > 1e-2
