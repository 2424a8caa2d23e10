"""M-RoPE position ids against transformers' own Qwen2_5_VLModel.get_rope_index."""

import pytest
import torch

from megatron_ral.models.qwen25vl.rope_index import RopeIndexConfig, decode_position_ids, get_rope_index
from megatron_ral.testing.models import TOKEN_IDS, make_prompt, tiny_hf_config

IMG, VID = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]


@pytest.fixture(scope="module")
def hf_config():
    return tiny_hf_config("tiny")


@pytest.fixture(scope="module")
def hf_model(hf_config):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return Qwen2_5_VLModel(hf_config).eval()


def hf_rope_index(hf_model, prompt):
    ids = prompt.input_ids
    return hf_model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == IMG).int() + 2 * (ids == VID).int(),
        image_grid_thw=prompt.image_grid_thw,
        video_grid_thw=prompt.video_grid_thw,
        second_per_grid_ts=prompt.second_per_grid_ts,
        attention_mask=prompt.attention_mask,
    )


def ours(hf_config, prompt, mode):
    cfg = RopeIndexConfig.from_hf_config(hf_config, text_after_vision=mode)
    return get_rope_index(
        prompt.input_ids, cfg, prompt.image_grid_thw, prompt.video_grid_thw, prompt.second_per_grid_ts,
        prompt.attention_mask,
    )


MIXED_BATCHES = [
    # (rows, second_per_grid_ts, padding side)
    ([[5, ("image", (1, 4, 6)), 3, ("video", (4, 4, 4)), 7, ("image", (1, 2, 2)), 2]], [0.5], "left"),
    ([[3, ("video", (6, 2, 4)), 4, ("video", (2, 4, 4)), 5], [9, ("image", (1, 6, 4)), 2]], [0.7, 1.5], "left"),
    ([[2, ("image", (1, 4, 4)), 2], [6, ("video", (4, 6, 2)), 1, ("image", (1, 2, 4)), 3]], [2.0], "right"),
    ([[4, ("video", (8, 2, 2)), 3]], [1.0 / 3.0], "left"),
    ([[4, ("video", (4, 4, 4)), 3]], None, "left"),
    ([[12], [3, ("image", (1, 2, 2)), 1]], None, "left"),
    ([[3, ("video", (2, 8, 8)), 2, ("image", (1, 4, 6)), 1]], [0.5], "left"),
    ([[1, ("image", (1, 2, 4)), 3, ("video", (4, 12, 8)), 2], [5, ("video", (2, 4, 8)), 1]], [0.5, 0.25], "right"),
]


@pytest.mark.parametrize("rows,secs,side", MIXED_BATCHES)
def test_spatial_extent_mode_equals_transformers(hf_config, hf_model, rows, secs, side):
    prompt = make_prompt(rows, seed=1, second_per_grid_ts=secs, padding_side=side, pad_to=None)
    ref_pos, ref_delta = hf_rope_index(hf_model, prompt)
    pos, delta = ours(hf_config, prompt, "spatial_extent")
    keep = prompt.attention_mask.bool()
    assert torch.equal(pos[:, keep], ref_pos[:, keep])
    assert torch.equal(delta, ref_delta)


@pytest.mark.parametrize("rows,secs,side", MIXED_BATCHES)
def test_released_mode_equals_transformers_when_time_is_shorter_than_space(hf_config, hf_model, rows, secs, side):
    """The two rules differ only after a video whose temporal extent reaches its spatial extent."""
    prompt = make_prompt(rows, seed=2, second_per_grid_ts=secs, padding_side=side)
    vids = prompt.video_grid_thw.tolist() if prompt.video_grid_thw is not None else []
    s = prompt.second_per_grid_ts.tolist() if prompt.second_per_grid_ts is not None else [1.0] * len(vids)
    agree = all(int((t - 1) * s_i * 2) < max(h, w) // 2 for (t, h, w), s_i in zip(vids, s))
    ref_pos, ref_delta = hf_rope_index(hf_model, prompt)
    pos, delta = ours(hf_config, prompt, "max_position")
    keep = prompt.attention_mask.bool()
    assert torch.equal(pos[:, keep], ref_pos[:, keep]) == agree
    assert torch.equal(delta, ref_delta) == agree


def test_video_time_positions_by_hand(hf_config):
    """Text, a 4-step 2x2-token video at 0.75 s per grid (interval 1.5), text.

    temporal index = floor(k * 1.5) = 0, 1, 3, 4; text resumes at max + 1 (released rule)."""
    prompt = make_prompt([[2, ("video", (4, 4, 4)), 2]], second_per_grid_ts=[0.75])
    pos, delta = ours(hf_config, prompt, "max_position")
    s = 3  # 2 text tokens + <|vision_start|>
    t_rows = [s + d for d in (0, 1, 3, 4) for _ in range(4)]
    h_rows = [s + i for _ in range(4) for i in (0, 0, 1, 1)]
    w_rows = [s + j for _ in range(4) for j in (0, 1, 0, 1)]
    after = s + 4 + 1
    expected = torch.tensor([
        [0, 1, 2] + t_rows + [after, after + 1, after + 2],
        [0, 1, 2] + h_rows + [after, after + 1, after + 2],
        [0, 1, 2] + w_rows + [after, after + 1, after + 2],
    ])
    assert torch.equal(pos[:, 0], expected)
    assert delta.item() == (after + 2 + 1) - prompt.input_ids.shape[1]


def test_second_per_grid_ts_changes_only_temporal_row(hf_config):
    a = make_prompt([[3, ("video", (6, 4, 4)), 2]], second_per_grid_ts=[1.0])
    b = make_prompt([[3, ("video", (6, 4, 4)), 2]], second_per_grid_ts=[2.5])
    pa, _ = ours(hf_config, a, "max_position")
    pb, _ = ours(hf_config, b, "max_position")
    vid = a.input_ids[0] == VID
    assert torch.equal(pa[1:, 0, vid], pb[1:, 0, vid])
    t_b = pb[0, 0, vid].unique() - pb[0, 0, vid].min()
    assert t_b.tolist() == [int(k * 2 * 2.5) for k in range(6)]


@pytest.mark.parametrize("mode", ["max_position", "spatial_extent"])
def test_decode_positions_continue_the_prompt(hf_config, mode):
    """Positions of generated text tokens = prefill of prompt+response, padding included."""
    cfg = RopeIndexConfig.from_hf_config(hf_config, text_after_vision=mode)
    rows = [[3, ("video", (4, 4, 4)), 2, 5], [2, ("image", (1, 4, 2)), 1, 5]]
    full = make_prompt(rows, seed=3, second_per_grid_ts=[1.5], padding_side="left")
    n_new = 5
    prompt_ids = full.input_ids[:, :-n_new]
    prompt_mask = full.attention_mask[:, :-n_new]
    full_pos, _ = get_rope_index(full.input_ids, cfg, full.image_grid_thw, full.video_grid_thw,
                                 full.second_per_grid_ts, full.attention_mask)
    _, delta = get_rope_index(prompt_ids, cfg, full.image_grid_thw, full.video_grid_thw,
                              full.second_per_grid_ts, prompt_mask)
    dec = decode_position_ids(prompt_mask.sum(1), delta, n_new)
    if mode == "max_position":
        assert torch.equal(dec, full_pos[:, :, -n_new:])
    else:  # transformers >= 5.3 prefill positions do not continue into its own decode positions
        assert not torch.equal(dec[:, 0], full_pos[:, 0, -n_new:])


def test_hf_decode_delta_matches(hf_config, hf_model):
    """transformers' decode step uses cumsum(mask) - 1 + rope_deltas; ours gives the same."""
    prompt = make_prompt([[3, ("image", (1, 4, 4)), 4], [1, ("image", (1, 2, 2)), 2]], seed=4)
    _, ref_delta = hf_rope_index(hf_model, prompt)
    mask = torch.cat([prompt.attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    ref = (mask.cumsum(-1) - 1)[:, -1:] + ref_delta
    _, delta = ours(hf_config, prompt, "max_position")
    dec = decode_position_ids(prompt.attention_mask.sum(1), delta, 1)
    assert torch.equal(dec[0], ref) and torch.equal(dec[1], ref) and torch.equal(dec[2], ref)


def test_back_to_back_images_in_one_run(hf_config):
    cfg = RopeIndexConfig.from_hf_config(hf_config)
    ids = torch.tensor([[7, IMG, IMG, IMG, IMG, IMG, 8]])  # image (1,2,2) = 1 token, then (1,2,8) = 4 tokens
    grids = torch.tensor([[1, 2, 2], [1, 2, 8]])
    pos, _ = get_rope_index(ids, cfg, image_grid_thw=grids)
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 6],
        [0, 1, 2, 2, 2, 2, 6],
        [0, 1, 2, 3, 4, 5, 6],
    ]


def test_inconsistent_grids_are_rejected(hf_config):
    cfg = RopeIndexConfig.from_hf_config(hf_config)
    prompt = make_prompt([[2, ("image", (1, 4, 4)), 2]])
    with pytest.raises(ValueError, match="placeholder"):
        get_rope_index(prompt.input_ids, cfg, image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 2]]))
    with pytest.raises(ValueError, match="grid_thw"):
        get_rope_index(prompt.input_ids, cfg)
    with pytest.raises(ValueError, match="does not fit"):
        get_rope_index(prompt.input_ids, cfg, image_grid_thw=torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="text_after_vision"):
        RopeIndexConfig(1, 2, text_after_vision="other")
