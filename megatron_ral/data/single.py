"""Model inputs of one image or video plus a prompt (the `tools/preprocess.py` library function)."""

from __future__ import annotations

import json
import os

import torch

from megatron_ral.config.data import DataConfig
from megatron_ral.data.media import MediaOptions, image_input, video_input
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.video.backend import BackendChoice, VideoDecoders, log_choice_once

DEFAULT_VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def _tokens_per_second(model_dir: str) -> float:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    vision = cfg.get("vision_config", {})
    return float(vision.get("tokens_per_second", cfg.get("tokens_per_second", 2)))


def mrope_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, processor: QwenVLProcessor, model_dir: str,
                       image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None) -> torch.Tensor:
    """3-row M-RoPE position ids [3, B, L] of a batch (rope index of the model package)."""
    from megatron_ral.models.qwen25vl.rope_index import RopeIndexConfig, get_rope_index

    cfg = RopeIndexConfig(
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        spatial_merge_size=processor.params.merge_size,
        tokens_per_second=_tokens_per_second(model_dir),
    )
    position_ids, _ = get_rope_index(input_ids, cfg, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask)
    return position_ids


def preprocess_single(
    model_dir: str,
    *,
    video: str | None = None,
    image: str | None = None,
    prompt: str | None = None,
    fps: float = 2.0,
    max_frames: int = 768,
    min_frames: int = 4,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int = DEFAULT_VIDEO_TOTAL_PIXELS,
    backend: str = "auto",
    processor: QwenVLProcessor | None = None,
) -> dict:
    """input_ids, attention_mask, pixel values, grid, second_per_grid_ts, position_ids, frame_indices.

    The conversation is one user turn with the media first and `prompt` after it, rendered by the
    checkpoint's chat template with the generation prompt appended (as Qwen2_5_VLProcessor.apply_chat_template
    does). Pixel limits default to the checkpoint's preprocessor config.
    """
    if (video is None) == (image is None):
        raise ValueError("give exactly one of video / image")
    processor = processor or QwenVLProcessor.from_pretrained(model_dir)
    params = processor.params
    kind = "video" if video is not None else "image"
    if kind == "video":
        lo = params.video_min_pixels if min_pixels is None else min_pixels
        hi = params.video_max_pixels if max_pixels is None else max_pixels
    else:
        lo = params.image_min_pixels if min_pixels is None else min_pixels
        hi = params.image_max_pixels if max_pixels is None else max_pixels
    cfg = DataConfig(fps=fps, min_frames=min_frames, max_frames=max_frames, video_min_pixels=lo, video_max_pixels=hi,
                     video_total_pixels=total_pixels, image_min_pixels=lo, image_max_pixels=hi, video_backend=backend)
    cfg.validate()
    opts = MediaOptions.from_config(cfg)
    if kind == "video":
        decoders = VideoDecoders(backend, cfg.dali_device)
        vision = video_input(video, params, opts, decoders)
        meta = vision.meta
        log_choice_once(meta["codec"], BackendChoice(meta["backend"], meta["device"], meta["backend_reason"]))
    else:
        vision = image_input(image, params, opts)
    text = prompt if prompt is not None else f"Describe this {kind}."
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
    input_ids = processor.encode_prompt(messages, [vision]).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    grid = torch.tensor([vision.grid_thw], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind == "video":
        spgt = torch.tensor([vision.second_per_grid_ts], dtype=torch.float32)
        out.update(pixel_values_videos=vision.pixel_values, video_grid_thw=grid, second_per_grid_ts=spgt,
                   frame_indices=torch.tensor(vision.frame_indices, dtype=torch.long))
        out["position_ids"] = mrope_position_ids(input_ids, attention_mask, processor, model_dir,
                                                 video_grid_thw=grid, second_per_grid_ts=spgt)
        out["meta"] = {k: vision.meta[k] for k in ("codec", "backend", "device", "colour", "total_frames", "video_fps")}
        out["meta"]["sample_fps"] = vision.sample_fps
    else:
        out.update(pixel_values=vision.pixel_values, image_grid_thw=grid)
        out["position_ids"] = mrope_position_ids(input_ids, attention_mask, processor, model_dir, image_grid_thw=grid)
        out["meta"] = {}
    out["meta"]["resized"] = list(vision.meta["resized"])
    return out
