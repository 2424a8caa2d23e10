"""Frame sampling of Qwen2.5-VL videos (qwen-vl-utils rules) and the optional token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ral.data.geometry import VisionParams, grid_thw, num_llm_tokens, video_resize_target


@dataclass(frozen=True)
class FramePlan:
    """Which frames to decode and how the model sees time.

    indices:    frame indices into the decoded stream (0-based, ascending, may repeat for tiny videos)
    sample_fps: len(indices) / total_frames * video_fps
    """

    indices: list[int]
    sample_fps: float
    total_frames: int
    video_fps: float

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def second_per_grid_ts(self, temporal_patch_size: int = 2) -> float:
        """Seconds covered by one temporal grid step: temporal_patch_size / sample_fps."""
        return temporal_patch_size / self.sample_fps


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def qwen_num_frames(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int, frame_factor: int = 2) -> int:
    """Number of frames to sample (qwen-vl-utils `smart_nframes`, fps mode).

    n = floor_f(min(max(total/video_fps*fps, ceil_f(min_frames)), floor_f(max_frames), total)), f = frame_factor.
    Videos shorter than f frames (qwen-vl-utils rejects them) keep all their frames; the temporal
    padding of the preprocessing then repeats the last one.
    """
    if total_frames < 1:
        raise ValueError("video has no frames")
    if video_fps <= 0:
        raise ValueError(f"video fps must be > 0, got {video_fps}")
    if total_frames < frame_factor:
        return total_frames
    lo = _ceil_by(min_frames, frame_factor)
    hi = _floor_by(max_frames, frame_factor)
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    return max(frame_factor, _floor_by(n, frame_factor))


def qwen_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """linspace(0, total_frames - 1, num_frames).round(), computed with torch as qwen-vl-utils does
    (float32 linspace, round half to even)."""
    return torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()


def plan_frames(
    total_frames: int,
    video_fps: float,
    fps: float,
    min_frames: int,
    max_frames: int,
    frame_factor: int = 2,
) -> FramePlan:
    """Qwen frame indices and sample_fps of a video with `total_frames` frames at `video_fps`."""
    n = qwen_num_frames(total_frames, video_fps, fps, min_frames, max_frames, frame_factor)
    return FramePlan(qwen_frame_indices(total_frames, n), n / total_frames * video_fps, total_frames, video_fps)


def fit_token_budget(
    plan: FramePlan,
    height: int,
    width: int,
    params: VisionParams,
    min_pixels: int,
    max_pixels: int,
    total_pixels: int,
    max_tokens: int | None,
) -> FramePlan:
    """Reduce the frame count (in steps of temporal_patch_size) until the video fits `max_tokens` LM tokens.

    The frames stay spread over the whole video (same linspace rule on fewer frames), so a long video
    is subsampled, never cut to its beginning. Returns the plan unchanged when it already fits.
    """
    if max_tokens is None:
        return plan
    tp = params.temporal_patch_size

    def tokens(n: int) -> int:
        h, w = video_resize_target(height, width, n, params, min_pixels, max_pixels, total_pixels)
        return num_llm_tokens(grid_thw(n, h, w, params), params.merge_size)

    n = plan.num_frames
    while n > tp and tokens(n) > max_tokens:
        n -= tp
    if n == plan.num_frames:
        return plan
    if tokens(n) > max_tokens:
        raise ValueError(f"a {height}x{width} video needs {tokens(n)} tokens even at {n} frames (budget {max_tokens})")
    total = plan.total_frames
    return FramePlan(qwen_frame_indices(total, n), n / total * plan.video_fps, total, plan.video_fps)
