"""Batching of Samples: padded token tensors and concatenated vision inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_ral.data.records import Record
from megatron_ral.data.samples import Sample


@dataclass
class Batch:
    """A batch in the layout Qwen2.5-VL expects.

    input_ids / attention_mask: [B, L], padded with pad_token_id on `padding_side`.
    loss_mask: [B, L] (SFT batches), 0 on padding and prompt.
    prompt_lengths: [B] unpadded prompt lengths.
    pixel_values / image_grid_thw: images of the batch, concatenated in sample order ([N, 1176], [n_img, 3]).
    pixel_values_videos / video_grid_thw / second_per_grid_ts: the same for videos ([n_vid] seconds per grid step).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    records: list[Record]
    loss_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    frame_indices: list[list[int] | None] = field(default_factory=list)
    padding_side: str = "right"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict:
        """The keyword arguments of a Qwen2.5-VL forward (None entries dropped)."""
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def collate(samples: list[Sample], pad_token_id: int, padding_side: str = "right") -> Batch:
    if not samples:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s.input_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    sft = all(s.loss_mask is not None for s in samples)
    loss_mask = torch.zeros((b, length), dtype=torch.float32) if sft else None
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, sl] = s.input_ids
        mask[i, sl] = 1
        if sft:
            loss_mask[i, sl] = s.loss_mask
    images = [v for s in samples for v in s.vision if v.kind == "image"]
    videos = [v for s in samples for v in s.vision if v.kind == "video"]
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        prompt_lengths=torch.tensor([s.prompt_length for s in samples], dtype=torch.long),
        records=[s.record for s in samples],
        loss_mask=loss_mask,
        pixel_values=torch.cat([v.pixel_values for v in images]) if images else None,
        image_grid_thw=torch.tensor([v.grid_thw for v in images], dtype=torch.long) if images else None,
        pixel_values_videos=torch.cat([v.pixel_values for v in videos]) if videos else None,
        video_grid_thw=torch.tensor([v.grid_thw for v in videos], dtype=torch.long) if videos else None,
        second_per_grid_ts=torch.tensor([v.second_per_grid_ts for v in videos], dtype=torch.float32) if videos else None,
        frame_indices=[next((v.frame_indices for v in s.vision if v.kind == "video"), None) for s in samples],
        padding_side=padding_side,
    )
