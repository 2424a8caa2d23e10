"""Splitting a padded processor batch into per-prompt generation inputs, and back.

A left-padded batch mixing images and videos (two items in one row) splits into rows whose ids
are the unpadded tokens and whose pixels / grids / seconds-per-grid are exactly that row's items;
concatenating the rows' vision inputs gives back the batch's; inconsistent inputs are refused.
"""

import pytest
import torch

from megatron_ral.inference.prompts import PromptInput, concat_vision, split_batch
from megatron_ral.testing.models import TOKEN_IDS, make_prompt

IMG, VID = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]


def test_split_left_padded_mixed_batch():
    batch = make_prompt(
        [[3, ("image", (1, 2, 4)), 9], [2, ("video", (2, 4, 8)), 2, ("image", (1, 4, 4)), 3], [5],
         [1, ("video", (4, 4, 4)), 1]],
        seed=3, second_per_grid_ts=[1.5, 0.5], padding_side="left")
    rows = split_batch(**batch.model_inputs(), image_token_id=IMG, video_token_id=VID)
    assert len(rows) == 4
    for b, row in enumerate(rows):
        keep = batch.attention_mask[b].bool()
        assert row.input_ids.tolist() == batch.input_ids[b][keep].tolist()
    assert rows[0].image_grid_thw.tolist() == [[1, 2, 4]] and rows[0].video_grid_thw is None
    assert rows[1].image_grid_thw.tolist() == [[1, 4, 4]] and rows[1].video_grid_thw.tolist() == [[2, 4, 8]]
    assert rows[1].second_per_grid_ts.tolist() == [1.5] and rows[3].second_per_grid_ts.tolist() == [0.5]
    assert rows[2].pixel_values is None and rows[2].pixel_values_videos is None
    # pixel rows: image 0 = first 8 patches, image 1 = the next 16
    assert torch.equal(rows[0].pixel_values, batch.pixel_values[:8])
    assert torch.equal(rows[1].pixel_values, batch.pixel_values[8:24])
    assert torch.equal(rows[3].pixel_values_videos, batch.pixel_values_videos[64:])
    joined = concat_vision(rows)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(joined[key], getattr(batch, key)), key


def test_refuses_inconsistent_inputs():
    batch = make_prompt([[3, ("image", (1, 2, 4)), 2]], seed=1)
    inputs = batch.model_inputs()
    inputs["image_grid_thw"] = torch.tensor([[1, 2, 2]])
    with pytest.raises(ValueError, match="image"):
        split_batch(**inputs, image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="go together"):
        PromptInput(batch.input_ids[0], pixel_values=batch.pixel_values)
    with pytest.raises(ValueError, match="non-empty"):
        PromptInput(torch.tensor([], dtype=torch.long))
