"""NVIDIA DALI video decoding of explicit frame indices.

One pipeline serves both devices:
- CPU (`device_id=None`): `fn.decoders.video` on the CPU backend, which decodes VP8, VP9 and MJPEG;
  frames come back at their native size and are resized by the shared torch preprocessing.
- GPU: the same decoder on the "mixed" backend (NVDEC: H.264, HEVC, VP8/VP9, AV1, MPEG-4, MJPEG),
  followed by a bicubic antialiased `fn.resize` to the Qwen target size on the GPU.
The frame indices are computed in Python (the Qwen rule) and fed per sample through `frames=`.

DALI returns RGB converted with a fixed BT.601 matrix (the range is the stream's); for a stream with
another matrix (e.g. BT.709, typical of HD H.264/HEVC) the frames go through ``colour.rematrix``, the
shared torch step that PyAV's planes go through too, on the frames' device.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_ral.data.errors import MediaError
from megatron_ral.data.video.colour import rematrix
from megatron_ral.data.video.probe import VideoInfo

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def dali_codecs(device: str) -> frozenset[str]:
    """Codecs DALI's video decoder handles on `device` ("cpu" | "gpu")."""
    return GPU_CODECS if device == "gpu" else CPU_CODECS


def _dali_reason(message: str) -> str:
    """The operator's own error text out of DALI's multi-line pipeline error."""
    lines = [l.strip() for l in message.splitlines()]
    if "encountered:" in lines:
        tail = [l for l in lines[lines.index("encountered:") + 1 :] if l and not l.startswith("C++ context")]
        tail = [l for l in tail if "no longer valid" not in l]
        if tail:
            return tail[0]
    return next((l for l in lines if l), "unknown error")


class DaliDecoder:
    """Decodes explicit frame indices with a DALI pipeline built lazily in the calling process.

    device: "cpu" or "gpu". On GPU `decode(..., size=(h, w))` also resizes on the device and returns
    frames already at the target size; on CPU `size` is ignored and native frames are returned.
    device_id: the CUDA device (GPU only); None = this process's device by the platform rule
    (``platform.devices.local_cuda_device``), resolved when the pipeline is built, so a data-loader
    worker uses its rank's device. A pipeline that cannot be built is a ``decoder_failed`` MediaError.
    """

    name = "dali"

    def __init__(self, device: str = "cpu", device_id: int | None = None, num_threads: int = 2):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
        self.device = device
        self.device_id = device_id
        self.num_threads = num_threads
        self._pipe = None

    def can_decode(self, codec: str) -> bool:
        return codec in dali_codecs(self.device)

    @property
    def resizes(self) -> bool:
        """True when the decoder resizes frames itself (GPU path)."""
        return self.device == "gpu"

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        if gpu:
            if self.device_id is None:
                from megatron_ral.platform.devices import local_cuda_device

                self.device_id = local_cuda_device().index
            # This process (a data-loader worker is one) decodes on this rank's device; the torch
            # tensors the frames are copied into and the colour step run there too.
            torch.cuda.set_device(self.device_id)

        @pipeline_def(
            batch_size=1,
            num_threads=self.num_threads,
            device_id=self.device_id if gpu else None,
            exec_dynamic=True,
            prefetch_queue_depth=1,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            if gpu:
                # affine=False: the decoder threads of the several processes sharing a node (ranks,
                # data workers) are not pinned to the same cores.
                video = fn.decoders.video(encoded, frames=frames, device="mixed", affine=False)
                size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
                video = fn.resize(video, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            else:
                video = fn.decoders.video(encoded, frames=frames, device="cpu")
            return video

        pipe = pipeline()
        pipe.build()
        return pipe

    def _where(self) -> str:
        if self.device == "cpu":
            return "cpu"
        return "gpu" if self.device_id is None else f"gpu:{self.device_id}"

    def decode(self, info: VideoInfo, indices: list[int], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Return uint8 RGB frames [len(indices), 3, H, W] in the order of `indices` (on the GPU for
        device="gpu"), in the stream's own colour matrix (``info.colour``)."""
        if not indices:
            raise ValueError("no frame indices to decode")
        if min(indices) < 0 or max(indices) >= info.total_frames:
            # DALI pads out-of-range indices with blank frames; never let that happen silently.
            raise ValueError(f"frame indices out of range [0, {info.total_frames}) for {info.path}")
        if not self.can_decode(info.codec):
            raise ValueError(f"DALI on {self.device} cannot decode {info.codec} ({info.path})")
        if self.device == "gpu" and size is None:
            raise ValueError("the GPU path needs the target size")
        if self._pipe is None:
            try:
                self._pipe = self._build()
            except Exception as e:  # no usable device, driver or NVDEC: a counted failure, not a dead worker
                raise MediaError("decoder_failed", info.path,
                                 f"DALI pipeline on {self._where()} could not be built: {_dali_reason(str(e))}") from e
        pipe = self._pipe
        encoded = np.fromfile(info.path, dtype=np.uint8)
        try:
            pipe.feed_input("encoded", [encoded])
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            if self.device == "gpu":
                pipe.feed_input("size", [np.asarray(size, dtype=np.float32)])
            (out,) = pipe.run()
        except Exception as e:
            self._pipe = None  # a pipeline that hit an error is rebuilt for the next file
            raise MediaError("corrupt_media", info.path, f"DALI decode failed: {_dali_reason(str(e))}") from e
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            frames = torch.empty(dense.shape(), dtype=torch.uint8, device=torch.device("cuda", self.device_id))
            feed_ndarray(dense, frames, cuda_stream=torch.cuda.current_stream(frames.device))
        else:
            frames = torch.from_numpy(np.array(out[0]))
        if frames.dim() == 5:
            frames = frames[0]
        if frames.shape[0] != len(indices):
            raise MediaError("truncated", info.path, f"DALI returned {frames.shape[0]} of {len(indices)} frames")
        return rematrix(frames.permute(0, 3, 1, 2).contiguous(), info.colour)
