"""Qwen2.5-VL vision geometry: resize targets, per-frame pixel budgets, token counts."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionParams:
    """Patch geometry and normalisation of the vision tower (preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1.0 / 255.0
    # Pixel limits stored in the checkpoint's preprocessor config (used as tool defaults).
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def factor(self) -> int:
        """Side length (pixels) of one LM token: patch_size * merge_size (28)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 * temporal_patch_size * patch_size**2 (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "VisionParams":
        """Read preprocessor_config.json (and video_preprocessor_config.json if present)."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model_dir} has no preprocessor_config.json")
        with open(path) as f:
            cfg = json.load(f)
        vpath = os.path.join(model_dir, "video_preprocessor_config.json")
        vcfg = {}
        if os.path.exists(vpath):
            with open(vpath) as f:
                vcfg = json.load(f)

        def limits(c: dict, default_min: int, default_max: int) -> tuple[int, int]:
            size = c.get("size") or {}
            lo = c.get("min_pixels", size.get("shortest_edge", default_min))
            hi = c.get("max_pixels", size.get("longest_edge", default_max))
            return int(lo), int(hi)

        img_lo, img_hi = limits(cfg, 56 * 56, 28 * 28 * 1280)
        vid_lo, vid_hi = limits(vcfg, 128 * 28 * 28, 768 * 28 * 28) if vcfg else (128 * 28 * 28, 768 * 28 * 28)
        return cls(
            patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1.0 / 255.0)),
            image_min_pixels=img_lo,
            image_max_pixels=img_hi,
            video_min_pixels=vid_lo,
            video_max_pixels=vid_hi,
            extra={"preprocessor": cfg, "video_preprocessor": vcfg},
        )


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: float = 56 * 56, max_pixels: float = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width) of a Qwen2.5-VL input, as transformers' Qwen2-VL processors compute it.

    h, w = round(H/f)*f, round(W/f)*f; if h*w > max_pixels: scale by beta = sqrt(H*W/max_pixels) and
    floor to multiples of f (at least f); elif h*w < min_pixels: scale by beta = sqrt(min_pixels/(H*W))
    and ceil to multiples of f. Python's round() (half to even) is used, as in the reference.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} ({height}x{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_frame_max_pixels(num_frames: int, min_pixels: int, max_pixels: int, total_pixels: int, temporal_patch_size: int = 2) -> float:
    """Per-frame pixel cap of a video with `num_frames` sampled frames (qwen-vl-utils rule).

    cap = min(max_pixels, max(min(768*28*28, total_pixels / num_frames * temporal_patch_size), int(1.05 * min_pixels))):
    every frame gets an even share of the video's total pixel budget, but not less than 1.05x the minimum.
    The 768*28*28 term is the qwen-vl-utils ceiling for video frames.
    """
    share = min(768 * 28 * 28, total_pixels / max(num_frames, 1) * temporal_patch_size)
    return min(max_pixels, max(share, int(min_pixels * 1.05)))


def video_resize_target(height: int, width: int, num_frames: int, params: VisionParams, min_pixels: int, max_pixels: int, total_pixels: int) -> tuple[int, int]:
    """(height, width) every frame of a video is resized to, given its sampled frame count."""
    cap = video_frame_max_pixels(num_frames, min_pixels, max_pixels, total_pixels, params.temporal_patch_size)
    return smart_resize(height, width, params.factor, min_pixels=min_pixels, max_pixels=cap)


def grid_thw(num_frames: int, height: int, width: int, params: VisionParams) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of a resized input: frames padded to a multiple of temporal_patch_size."""
    tp = params.temporal_patch_size
    return (num_frames + tp - 1) // tp, height // params.patch_size, width // params.patch_size


def num_llm_tokens(grid: tuple[int, int, int], merge_size: int = 2) -> int:
    """LM placeholder tokens of one image/video: grid_t * grid_h * grid_w / merge_size**2."""
    t, h, w = grid
    return t * h * w // (merge_size * merge_size)
