"""Qwen2.5-VL multimodal rotary (M-RoPE) position ids.

Every token gets three position indices (temporal, height, width):

- text token: all three rows equal, counting up by one from the previous token's start;
- vision token of grid step (k, i, j) (after the 2x2 spatial merge) of an image or video
  starting at position ``s``:  ``(s + floor(k * interval), s + i, s + j)`` where
  ``interval = tokens_per_second * second_per_grid_t`` for videos and ``1`` for images;
- text after a vision block starts at ``max(positions of the block) + 1``.

The rope delta of a sequence is ``max(position) + 1 - number_of_real_tokens``; during decoding the
new token at cache position ``c`` (counting real tokens only) gets ``c + delta`` in all three rows.

Text after a video: the released Qwen2.5-VL code (and vLLM, transformers <= 5.2) resumes at the
maximum position of the video block + 1, which includes the temporal row. transformers >= 5.3
resumes at ``start + max(h, w) / merge`` instead, ignoring the temporal extent, which makes text
positions overlap the video's temporal positions and disagree with its own decode delta. The two
agree for images and for videos whose temporal extent is below their spatial extent.
``text_after_vision="max_position"`` (default) is the released behaviour;
``"spatial_extent"`` reproduces transformers >= 5.3 exactly.

Pure torch; no megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class RopeIndexConfig:
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 2
    text_after_vision: Literal["max_position", "spatial_extent"] = "max_position"

    def __post_init__(self):
        if self.text_after_vision not in ("max_position", "spatial_extent"):
            raise ValueError(
                f"text_after_vision must be 'max_position' or 'spatial_extent', got {self.text_after_vision!r}"
            )

    @classmethod
    def from_hf_config(cls, hf_config, **overrides) -> "RopeIndexConfig":
        """Read the ids and vision constants from a transformers Qwen2_5_VLConfig."""
        vision = hf_config.vision_config
        kwargs = dict(
            image_token_id=hf_config.image_token_id,
            video_token_id=hf_config.video_token_id,
            spatial_merge_size=vision.spatial_merge_size,
            tokens_per_second=vision.tokens_per_second,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _runs(token_types: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values as (value, start, end)."""
    runs = []
    start = 0
    for idx in range(1, len(token_types) + 1):
        if idx == len(token_types) or token_types[idx] != token_types[start]:
            runs.append((token_types[start], start, idx))
            start = idx
    return runs


def vision_block_positions(
    start: int,
    grid_thw: Sequence[int],
    spatial_merge_size: int,
    time_interval: float | torch.Tensor = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(3, t*h*w/merge^2) positions of one image/video block starting at ``start``.

    temporal = start + floor(k * time_interval) (computed as in transformers: the product in the
    dtype of ``time_interval``, then truncated), height = start + i, width = start + j.
    """
    t = int(grid_thw[0])
    h = int(grid_thw[1]) // spatial_merge_size
    w = int(grid_thw[2]) // spatial_merge_size
    temporal = (torch.arange(t, device=device) * time_interval).long()
    height = torch.arange(h, device=device)
    width = torch.arange(w, device=device)
    tt, hh, ww = torch.meshgrid(temporal, height, width, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _tokens_of(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    return int(grid_thw[0]) * int(grid_thw[1]) * int(grid_thw[2]) // (spatial_merge_size**2)


def get_rope_index(
    input_ids: torch.Tensor,
    config: RopeIndexConfig,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, S) and rope deltas (B, 1) for a batch of token ids.

    Images and videos are consumed in order over the whole batch (row by row), as the processor
    emits them: ``image_grid_thw`` (num_images, 3), ``video_grid_thw`` (num_videos, 3),
    ``second_per_grid_ts`` (num_videos,) seconds per temporal grid step (1 if not given).
    ``attention_mask`` (B, S), 1 for real tokens: padding (left or right) is skipped and gets
    position 0. A run of consecutive pad tokens may hold several images/videos back to back.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    device = input_ids.device
    merge = config.spatial_merge_size
    position_ids = torch.zeros(3, batch, seq, dtype=input_ids.dtype, device=device)

    grids = {
        IMAGE: list(image_grid_thw.tolist()) if image_grid_thw is not None else [],
        VIDEO: list(video_grid_thw.tolist()) if video_grid_thw is not None else [],
    }
    if second_per_grid_ts is None:
        seconds = [1] * len(grids[VIDEO])
    elif isinstance(second_per_grid_ts, torch.Tensor):
        seconds = list(second_per_grid_ts.reshape(-1).unbind(0))
    else:
        seconds = list(torch.as_tensor(second_per_grid_ts, dtype=torch.float32).unbind(0))
    if len(seconds) < len(grids[VIDEO]):
        raise ValueError(
            f"second_per_grid_ts has {len(seconds)} entries for {len(grids[VIDEO])} videos"
        )
    cursor = {IMAGE: 0, VIDEO: 0}

    token_type = torch.zeros_like(input_ids, dtype=torch.long)
    token_type[input_ids == config.image_token_id] = IMAGE
    token_type[input_ids == config.video_token_id] = VIDEO

    deltas = []
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else None
        types = token_type[b][keep] if keep is not None else token_type[b]
        n_real = int(types.numel())
        pieces = []
        current = 0
        for kind, start, end in _runs(types.tolist()):
            if kind == TEXT:
                pieces.append(torch.arange(end - start, device=device).expand(3, -1) + current)
                current += end - start
                continue
            remaining = end - start
            while remaining > 0:
                if cursor[kind] >= len(grids[kind]):
                    name = "image" if kind == IMAGE else "video"
                    raise ValueError(f"more {name} placeholder tokens than {name}_grid_thw entries")
                grid = grids[kind][cursor[kind]]
                interval = 1
                if kind == VIDEO:
                    interval = config.tokens_per_second * seconds[cursor[kind]]
                cursor[kind] += 1
                n_tok = _tokens_of(grid, merge)
                if n_tok > remaining:
                    raise ValueError(
                        f"a run of {remaining} vision placeholder tokens does not fit grid {grid} "
                        f"({n_tok} tokens after {merge}x{merge} merge)"
                    )
                block = vision_block_positions(current, grid, merge, interval, device=device)
                pieces.append(block)
                if config.text_after_vision == "max_position":
                    current = int(block.max()) + 1
                else:
                    current += max(int(grid[1]), int(grid[2])) // merge
                remaining -= n_tok
        if pieces:
            positions = torch.cat(pieces, dim=1).to(position_ids.dtype)
            if keep is not None:
                position_ids[:, b, keep] = positions
            else:
                position_ids[:, b] = positions
            deltas.append(int(positions.max()) + 1 - n_real)
        else:
            deltas.append(0)
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        if cursor[kind] != len(grids[kind]):
            raise ValueError(
                f"{len(grids[kind])} {name}_grid_thw entries but placeholders for only {cursor[kind]}"
            )
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)


def decode_position_ids(
    cache_position: torch.Tensor | int, rope_deltas: torch.Tensor, num_tokens: int = 1
) -> torch.Tensor:
    """(3, B, num_tokens) positions of generated tokens: ``cache_position + k + delta``.

    ``cache_position`` (B,) or int: number of real (non-padding) tokens before the first new token;
    ``rope_deltas`` (B, 1) from :func:`get_rope_index`.
    """
    deltas = rope_deltas.reshape(-1, 1)
    if not isinstance(cache_position, torch.Tensor):
        cache_position = torch.full((deltas.shape[0],), int(cache_position), device=deltas.device)
    steps = torch.arange(num_tokens, device=deltas.device)
    pos = cache_position.reshape(-1, 1).to(deltas.dtype) + steps + deltas
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
