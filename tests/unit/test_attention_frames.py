"""attention.frames: the per-frame / per-patch split of attention rows, checked by hand, and the frames
recovered from patch rows (the inverse of the pipeline's normalise + patchify)."""

from __future__ import annotations

import torch

from megatron_ral.attention.frames import frames_from_pixels, media_attention, vision_mass
from megatron_ral.data.geometry import VisionParams
from megatron_ral.data.pixels import normalize, patchify

V, I = 9, 8  # video / image placeholder ids


def test_media_attention_by_hand():
    # text(2) | video grid (2, 4, 6): 2 steps of 2 x 3 merged patches | text(1) | response(2)
    ids = torch.tensor([1, 2] + [V] * 12 + [3, 4, 5])
    rows = torch.rand(2, ids.numel(), dtype=torch.float64)
    rows /= rows.sum(-1, keepdim=True)
    att = media_attention(rows, ids, V, torch.tensor([[2, 4, 6]]), merge_size=2, second_per_grid_ts=[1.5])
    assert att.frame_mass.shape == (2, 2) and att.start_seconds == [0.0, 1.5] and att.item == [0, 0]
    torch.testing.assert_close(att.frame_mass[:, 0], rows[:, 2:8].sum(-1))
    torch.testing.assert_close(att.frame_mass[:, 1], rows[:, 8:14].sum(-1))
    torch.testing.assert_close(att.patch_mass[1][1, 1, 2], rows[1, 13])   # step 1, row 1 of patches, column 2
    torch.testing.assert_close(att.patch_mass[0][0, 0, 1], rows[0, 3])
    torch.testing.assert_close(att.frame_mass.sum(-1), vision_mass(rows, ids, [V, I]))


def test_media_attention_two_items_and_a_wrong_grid():
    ids = torch.tensor([I] * 4 + [0] + [I] * 1)
    rows = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    att = media_attention(rows, ids, I, torch.tensor([[1, 4, 4], [1, 2, 2]]), merge_size=2)
    assert att.item == [0, 1]
    torch.testing.assert_close(att.frame_mass, torch.stack([rows[:, :4].sum(-1), rows[:, 5]], dim=1))
    try:
        media_attention(rows, ids, I, torch.tensor([[1, 4, 4]]), merge_size=2)
    except ValueError as e:
        assert "5 placeholder tokens but the grids need 4" in str(e)
    else:
        raise AssertionError("a grid that does not match the placeholders must be refused")


def test_frames_from_pixels_inverts_patchify():
    params = VisionParams()
    frames = torch.randint(0, 256, (4, 3, 56, 84), dtype=torch.uint8)
    patches, grid = patchify(normalize(frames, params), params)
    back = frames_from_pixels(patches, grid, params.patch_size, params.merge_size, params.temporal_patch_size,
                              params.image_mean, params.image_std, params.rescale_factor)
    assert back.shape == (4, 56, 84, 3)
    assert torch.equal(back, frames.permute(0, 2, 3, 1))
