"""Container probing: codec, size, frame count, fps and a frame index, without decoding pixels."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_ral.data.errors import MediaError
from megatron_ral.data.video.colour import ColourSpec, resolve_colour


@dataclass(frozen=True)
class VideoInfo:
    """What the decoders and the frame sampler need to know about a video file.

    total_frames counts the stream's non-empty packets (one packet per displayed frame), so it does
    not trust a container header that may be missing (WebM) or wrong (truncated files).
    frame_pts: presentation timestamps in display order (frame i has pts frame_pts[i]), None when
    the stream has none; keyframes: frame indices of keyframes (ascending).
    colour: the Y'CbCr matrix and range of the stream (its tags, or the untagged rule), which both
    decoders convert with (see colour.py).
    """

    path: str
    codec: str
    width: int
    height: int
    total_frames: int
    fps: float
    pix_fmt: str | None = None
    frame_pts: list[int] | None = field(default=None, repr=False)
    keyframes: list[int] = field(default_factory=list, repr=False)
    colour: ColourSpec = field(default_factory=ColourSpec)

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def check_file(path: str) -> None:
    """Raise MediaError('missing_file' | 'empty_file') for a path that cannot hold media."""
    if not os.path.exists(path):
        raise MediaError("missing_file", path, "no such file")
    if not os.path.isfile(path):
        raise MediaError("missing_file", path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError("empty_file", path, "file is empty")


def _announced_frames(container, stream, rate) -> int | None:
    """Frame count the container header promises (frame count, else stream or single-stream duration x fps)."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if not rate:
        return None
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    return int(round(seconds * float(rate))) if seconds else None


def probe_video(path: str, untagged_matrix: str = "auto") -> VideoInfo:
    """Demux (no decode) the first video stream of `path` with PyAV. ``untagged_matrix``: the Y'CbCr
    matrix of a stream without a matrix tag ("auto": BT.601 for SD, BT.709 for HD; see colour.py)."""
    import av

    check_file(path)
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises several error types for unreadable containers
        raise MediaError("corrupt_media", path, f"cannot open container: {e}") from e
    with container:
        if not container.streams.video:
            raise MediaError("no_frames", path, "no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name
        width, height = ctx.width, ctx.height
        pix_fmt = ctx.pix_fmt
        colour_tags = (ctx.colorspace, ctx.color_range)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        announced = _announced_frames(container, stream, rate)
        pts: list[int | None] = []
        keys: list[bool] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
        except Exception as e:
            if not pts:
                raise MediaError("corrupt_media", path, f"cannot demux: {e}") from e
            # A damaged tail: keep the packets read so far.
    if not pts:
        raise MediaError("no_frames", path, "video stream has no frames")
    if not width or not height:
        raise MediaError("corrupt_media", path, "video stream has no frame size")
    fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise MediaError("corrupt_media", path, "video stream has no frame rate")
    if announced is not None and len(pts) < announced - max(2, 0.02 * announced):
        raise MediaError("truncated", path, f"the container announces {announced} frames but only {len(pts)} are present")
    frame_pts = None
    keyframes = [0]
    if all(p is not None for p in pts):
        order = sorted(range(len(pts)), key=lambda i: pts[i])
        frame_pts = [pts[i] for i in order]
        if len(set(frame_pts)) == len(frame_pts):
            keyframes = [rank for rank, i in enumerate(order) if keys[i]] or [0]
        else:
            frame_pts = None
    colour = resolve_colour(*colour_tags, pix_fmt, width, height, untagged_matrix, codec)
    return VideoInfo(path, codec, width, height, len(pts), fps, pix_fmt, frame_pts, keyframes, colour)
