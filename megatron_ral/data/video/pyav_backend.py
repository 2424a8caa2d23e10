"""PyAV (FFmpeg) video decoding of explicit frame indices on CPU.

FFmpeg decodes to Y'CbCr planes; the conversion to RGB is the shared torch step of ``colour.py`` with the
stream's matrix and range (``VideoInfo.colour``), the same one DALI's output goes through.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_ral.data.errors import MediaError
from megatron_ral.data.video.colour import ColourSpec, frame_planes, planes_to_rgb
from megatron_ral.data.video.probe import VideoInfo


def _to_rgb(frame, colour: ColourSpec) -> torch.Tensor:
    """uint8 RGB [3, H, W] of one decoded frame."""
    y, cb, cr = (torch.from_numpy(p)[None] for p in frame_planes(frame))
    return planes_to_rgb(y, cb, cr, colour)[0]


class PyAVDecoder:
    """Decodes the frames `indices` (display-order indices as counted by probe_video).

    Frames are decoded in order; when the next wanted frame lies beyond the next keyframe, the
    decoder seeks to that keyframe instead of decoding the gap.
    """

    name = "pyav"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def decode(self, info: VideoInfo, indices: list[int]) -> torch.Tensor:
        """Return uint8 frames [len(indices), 3, H, W] in the order of `indices`."""
        import av

        if not indices:
            raise ValueError("no frame indices to decode")
        if min(indices) < 0 or max(indices) >= info.total_frames:
            raise ValueError(f"frame indices out of range [0, {info.total_frames}) for {info.path}")
        wanted = sorted(set(indices))
        got: dict[int, torch.Tensor] = {}
        try:
            with av.open(info.path) as container:
                stream = container.streams.video[0]
                stream.thread_count = self.threads
                if info.frame_pts is None:
                    self._decode_sequential(container, stream, info, wanted, got)
                else:
                    self._decode_seeking(container, stream, info, wanted, got)
            if len(got) < len(wanted) and info.frame_pts is not None:
                # Seeking can land off target in unusual streams: decode the rest in order.
                with av.open(info.path) as container:
                    stream = container.streams.video[0]
                    stream.thread_count = self.threads
                    self._decode_sequential(container, stream, info, [i for i in wanted if i not in got], got)
        except MediaError:
            raise
        except Exception as e:
            if len(got) < len(wanted):
                raise MediaError("corrupt_media", info.path, f"decode failed after {len(got)} of {len(wanted)} frames: {e}") from e
        missing = [i for i in wanted if i not in got]
        if missing:
            raise MediaError(
                "truncated",
                info.path,
                f"{len(missing)} of {len(wanted)} sampled frames did not decode (first missing index {missing[0]}, {info.total_frames} frames in container)",
            )
        return torch.stack([got[i] for i in indices])

    @staticmethod
    def _decode_sequential(container, stream, info: VideoInfo, wanted: list[int], got: dict) -> None:
        targets = set(wanted)
        last = wanted[-1]
        for idx, frame in enumerate(container.decode(stream)):
            if idx in targets and idx not in got:
                got[idx] = _to_rgb(frame, info.colour)
            if idx >= last:
                break

    @staticmethod
    def _decode_seeking(container, stream, info: VideoInfo, wanted: list[int], got: dict) -> None:
        pts_to_idx = {p: i for i, p in enumerate(info.frame_pts)}
        keyframes = np.asarray(info.keyframes)
        wanted_set = set(wanted)
        pos = -1  # index of the last frame decoded
        frames = None
        for target in wanted:
            if target in got:
                continue
            k = int(keyframes[np.searchsorted(keyframes, target, side="right") - 1])
            if frames is None or k > pos + 1 or target <= pos:
                container.seek(info.frame_pts[k], stream=stream, backward=True, any_frame=False)
                frames = iter(container.decode(stream))
            for frame in frames:
                idx = pts_to_idx.get(frame.pts)
                if idx is None:
                    continue
                pos = idx
                if idx in wanted_set and idx not in got:
                    got[idx] = _to_rgb(frame, info.colour)
                if idx >= target:
                    break
            else:
                return
