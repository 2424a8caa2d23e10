"""Media file -> VisionInput: decode (image or video) and apply the Qwen2.5-VL preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ral.config.data import DataConfig
from megatron_ral.data.errors import MediaError
from megatron_ral.data.geometry import VisionParams, smart_resize, video_resize_target
from megatron_ral.data.image import load_image
from megatron_ral.data.pixels import VisionInput, preprocess_image, preprocess_video
from megatron_ral.data.video.backend import VideoDecoders
from megatron_ral.data.video.probe import probe_video
from megatron_ral.data.video.sampling import fit_token_budget, plan_frames


@dataclass(frozen=True)
class MediaOptions:
    """The preprocessing knobs of DataConfig, in one place."""

    fps: float
    min_frames: int
    max_frames: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int
    max_video_tokens: int | None
    image_min_pixels: int
    image_max_pixels: int
    video_untagged_matrix: str = "auto"

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "MediaOptions":
        return cls(
            cfg.fps, cfg.min_frames, cfg.max_frames, cfg.video_min_pixels, cfg.video_max_pixels,
            cfg.video_total_pixels, cfg.max_video_tokens, cfg.image_min_pixels, cfg.image_max_pixels,
            cfg.video_untagged_matrix,
        )


def image_input(path: str, params: VisionParams, opts: MediaOptions) -> VisionInput:
    image = load_image(path)
    try:
        smart_resize(image.shape[1], image.shape[2], params.factor, opts.image_min_pixels, opts.image_max_pixels)
    except ValueError as e:
        raise MediaError("bad_geometry", path, str(e)) from e
    out = preprocess_image(image, params, opts.image_min_pixels, opts.image_max_pixels)
    out.meta["path"] = path
    return out


def video_input(path: str, params: VisionParams, opts: MediaOptions, decoders: VideoDecoders) -> VisionInput:
    """Probe, sample frames the Qwen way, decode them with the chosen backend (RGB in the stream's own
    colour matrix, see video/colour.py), preprocess."""
    info = probe_video(path, opts.video_untagged_matrix)
    plan = plan_frames(info.total_frames, info.fps, opts.fps, opts.min_frames, opts.max_frames, params.temporal_patch_size)
    try:
        plan = fit_token_budget(
            plan, info.height, info.width, params, opts.video_min_pixels, opts.video_max_pixels,
            opts.video_total_pixels, opts.max_video_tokens,
        )
        size = video_resize_target(
            info.height, info.width, plan.num_frames, params, opts.video_min_pixels, opts.video_max_pixels, opts.video_total_pixels
        )
    except ValueError as e:
        raise MediaError("bad_geometry", path, str(e)) from e
    choice = decoders.choose(info.codec, info.colour)
    decoder = decoders.decoder(choice)
    frames = decoder.decode(info, plan.indices, size) if decoder.name == "dali" else decoder.decode(info, plan.indices)
    resized = decoder.name == "dali" and decoder.resizes
    out = preprocess_video(
        frames, params, opts.video_min_pixels, opts.video_max_pixels, opts.video_total_pixels,
        sample_fps=plan.sample_fps, frame_indices=plan.indices, resized=resized,
    )
    out.meta.update(
        path=path, codec=info.codec, backend=choice.backend, device=choice.device, backend_reason=choice.reason,
        colour=info.colour.describe(),
        total_frames=info.total_frames, video_fps=info.fps, orig_size=(info.height, info.width),
    )
    return out
