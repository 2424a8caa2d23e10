"""Where response tokens attend in the media: attention mass per video frame and per image patch.

The inputs are last-layer attention-policy rows (``attention.dump.dump_attention``: row r is the head-mean
attention of response token r over the sequence) and the prompt's token ids. A vision item of grid
(t, h, w) holds t * (h / m) * (w / m) placeholder tokens (m: the spatial merge size), frame-major then in
raster order of the merged patches, so

    frame_mass[r, f]      = sum of row r over the placeholders of temporal step f   (f over every item's steps)
    patch_mass[r, f, y, x] = row r at the placeholder of merged patch (y, x) of step f

and sum_f frame_mass[r, f] is row r's vision mass (its attention on every vision placeholder). A temporal
step of a video covers ``temporal_patch_size`` frames and ``second_per_grid_ts`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MediaAttention:
    """frame_mass (R, F), patch_mass: one (R, h/m, w/m) tensor per temporal step, start_seconds (F,)
    (a video step's start time; 0 for images), item (F,) the vision item of each step."""

    frame_mass: torch.Tensor
    patch_mass: list
    start_seconds: list
    item: list


def vision_mass(rows: torch.Tensor, input_ids: torch.Tensor, vision_token_ids) -> torch.Tensor:
    """(R,) attention of each row on the vision placeholders: sum over columns whose id is a vision token."""
    ids = input_ids[: rows.shape[-1]]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for t in vision_token_ids:
        mask |= ids == int(t)
    return rows[:, mask].sum(dim=-1)


def media_attention(rows: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int, grids: torch.Tensor,
                    merge_size: int = 2, second_per_grid_ts=None) -> MediaAttention:
    """Split rows (R, T) over the placeholders (id ``placeholder_id``) of items with ``grids`` (N, 3) in order."""
    ids = input_ids[: rows.shape[-1]]
    cols = (ids == placeholder_id).nonzero().flatten()
    per_step = [(int(h) // merge_size) * (int(w) // merge_size) for _, h, w in grids.tolist()]
    need = sum(int(t) * n for (t, _, _), n in zip(grids.tolist(), per_step))
    if need != cols.numel():
        raise ValueError(f"{cols.numel()} placeholder tokens but the grids need {need}")
    masses, patches, starts, items, at = [], [], [], [], 0
    for i, ((t, h, w), n) in enumerate(zip(grids.tolist(), per_step)):
        secs = float(second_per_grid_ts[i]) if second_per_grid_ts is not None else 0.0
        for step in range(int(t)):
            block = rows[:, cols[at: at + n]]
            masses.append(block.sum(dim=-1))
            patches.append(block.reshape(rows.shape[0], int(h) // merge_size, int(w) // merge_size))
            starts.append(step * secs)
            items.append(i)
            at += n
    frame_mass = torch.stack(masses, dim=1) if masses else rows.new_zeros(rows.shape[0], 0)
    return MediaAttention(frame_mass, patches, starts, items)


def frames_from_pixels(pixel_values: torch.Tensor, grid_thw, patch_size: int, merge_size: int,
                       temporal_patch_size: int, mean, std, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """The frames (grid_t * temporal_patch_size, H, W, 3) uint8 behind one item's patch rows (the inverse of
    ``data.pixels.patchify`` and ``normalize``), at the resolution the model saw."""
    gt, gh, gw = (int(v) for v in grid_thw)
    p, m, tp = patch_size, merge_size, temporal_patch_size
    x = pixel_values.float().reshape(gt, gh // m, gw // m, m, m, 3, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(gt * tp, 3, gh * p, gw * p)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x * std + mean) / rescale_factor
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


__all__ = ["MediaAttention", "frames_from_pixels", "media_attention", "vision_mass"]
