"""Qwen2.5-VL pixel preprocessing: resize, normalise, temporal pad, patchify."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_ral.data.geometry import VisionParams, grid_thw, smart_resize, video_resize_target


@dataclass
class VisionInput:
    """One preprocessed image or video, ready for the vision tower.

    pixel_values: [grid_t*grid_h*grid_w, 3*temporal_patch*patch*patch] float32
    grid_thw:     (grid_t, grid_h, grid_w)
    kind:         "image" | "video"
    second_per_grid_ts: seconds covered by one temporal grid step (videos; temporal_patch_size / sample_fps)
    frame_indices: decoded frame indices (videos)
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    kind: str
    second_per_grid_ts: float | None = None
    frame_indices: list[int] | None = None
    sample_fps: float | None = None
    meta: dict = field(default_factory=dict)

    def num_tokens(self, merge_size: int = 2) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing of uint8 frames [T, 3, H, W] -> uint8 [T, 3, height, width].

    The operation torchvision's resize performs for the Qwen2-VL processors and qwen-vl-utils: on CPU
    torch's native uint8 antialiased bicubic kernel; elsewhere float32, then clamp to [0, 255], round
    and cast back.
    """
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    out = F.interpolate(frames.float(), size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def normalize(frames: torch.Tensor, params: VisionParams) -> torch.Tensor:
    """x -> (x * rescale_factor - mean) / std per channel, in float32. frames: [T, 3, H, W]."""
    mean = torch.tensor(params.image_mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(params.image_std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    return (frames.to(torch.float32) * params.rescale_factor - mean) / std


def patchify(frames: torch.Tensor, params: VisionParams) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [T, C, H, W] -> patches [grid_t*grid_h*grid_w, C*tp*p*p] and (grid_t, grid_h, grid_w).

    T is padded to a multiple of tp (temporal_patch_size) by repeating the last frame (an image is a
    one-frame video). Row order is the vision tower's: grid_t, then blocks of merge_size x merge_size
    patches in raster order (h_block, w_block, h_in_block, w_in_block); each row is laid out as
    (channel, t_in_patch, y_in_patch, x_in_patch).
    """
    tp, p, m = params.temporal_patch_size, params.patch_size, params.merge_size
    t, c, h, w = frames.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}")
    if pad := -t % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, m_h, m_w, c, tp, p_y, p_x]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_image(image: torch.Tensor, params: VisionParams, min_pixels: int, max_pixels: int) -> VisionInput:
    """uint8 image [3, H, W] -> VisionInput (resized by smart_resize within [min_pixels, max_pixels])."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    h, w = smart_resize(image.shape[1], image.shape[2], params.factor, min_pixels, max_pixels)
    frames = resize_frames(image.unsqueeze(0), h, w)
    values, grid = patchify(normalize(frames, params), params)
    return VisionInput(values, grid, "image", meta={"orig_size": tuple(image.shape[1:]), "resized": (h, w)})


def preprocess_video(
    frames: torch.Tensor,
    params: VisionParams,
    min_pixels: int,
    max_pixels: int,
    total_pixels: int,
    sample_fps: float,
    frame_indices: list[int] | None = None,
    resized: bool = False,
) -> VisionInput:
    """uint8 frames [T, 3, H, W] -> VisionInput.

    The resize target comes from the per-frame budget for T frames (see geometry.video_frame_max_pixels).
    `resized=True` means the frames are already at that size (resized by the decoder, e.g. DALI on GPU).
    second_per_grid_ts = temporal_patch_size / sample_fps.
    """
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected RGB frames [T>=1, 3, H, W], got shape {tuple(frames.shape)}")
    if resized:
        h, w = frames.shape[-2:]
    else:
        h, w = video_resize_target(frames.shape[2], frames.shape[3], frames.shape[0], params, min_pixels, max_pixels, total_pixels)
        frames = resize_frames(frames, h, w)
    values, grid = patchify(normalize(frames, params), params)
    assert grid == grid_thw(frames.shape[0], h, w, params)
    return VisionInput(
        values,
        grid,
        "video",
        second_per_grid_ts=params.temporal_patch_size / sample_fps,
        frame_indices=list(frame_indices) if frame_indices is not None else None,
        sample_fps=sample_fps,
        meta={"resized": (h, w)},
    )
