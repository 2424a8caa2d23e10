"""Choice of the video decoding backend per codec: `auto | dali | pyav`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_ral.data.video.colour import DALI_MATRIX, ColourSpec
from megatron_ral.data.video.dali_backend import DaliDecoder, dali_available, dali_codecs
from megatron_ral.data.video.pyav_backend import PyAVDecoder

logger = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "dali" | "pyav"
    device: str   # "cpu" | "gpu"
    reason: str

    def describe(self, codec: str) -> str:
        return f"video codec {codec}: {self.backend} on {self.device} ({self.reason})"


def resolve_dali_device(dali_device: str) -> str:
    """"auto" -> "gpu" when CUDA is available, else "cpu"."""
    if dali_device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return dali_device


def select_backend(codec: str, backend: str, dali_device: str, have_dali: bool | None = None,
                   colour: ColourSpec | None = None) -> BackendChoice:
    """Which decoder serves `codec` (with ``colour``, the stream's Y'CbCr matrix, when known).

    auto: DALI when it is installed and decodes the codec on this device (CPU: VP8/VP9/MJPEG; GPU:
    also H.264/HEVC/AV1/MPEG-4), PyAV otherwise. On the CPU, a stream whose matrix is not BT.601 goes
    to PyAV: DALI converts with a fixed BT.601 matrix, and undoing it cannot restore the colours it
    clipped, while PyAV is as fast there. On the GPU, DALI (NVDEC) stays and its matrix is undone
    (colour.rematrix). dali/pyav: that backend, or a ValueError naming the codec when DALI cannot
    decode it here.
    """
    if backend not in ("auto", "dali", "pyav"):
        raise ValueError(f"video backend must be auto|dali|pyav, got {backend!r}")
    device = resolve_dali_device(dali_device)
    have_dali = dali_available() if have_dali is None else have_dali
    if backend == "pyav":
        return BackendChoice("pyav", "cpu", "data.video_backend=pyav")
    dali_ok = have_dali and codec in dali_codecs(device)
    if backend == "dali":
        if not have_dali:
            raise ValueError("data.video_backend=dali but nvidia-dali is not installed; use auto or pyav")
        if not dali_ok:
            raise ValueError(
                f"data.video_backend=dali but DALI on {device} cannot decode {codec} "
                f"(it decodes {', '.join(sorted(dali_codecs(device)))} there); use auto or pyav"
            )
        return BackendChoice("dali", device, "data.video_backend=dali")
    if dali_ok and device == "cpu" and colour is not None and colour.matrix != DALI_MATRIX:
        return BackendChoice("pyav", "cpu",
                             f"DALI on cpu converts with a fixed BT.601 matrix; the stream is {colour.matrix}")
    if dali_ok:
        return BackendChoice("dali", device, f"DALI decodes {codec} on {device}")
    if not have_dali:
        return BackendChoice("pyav", "cpu", "DALI is not installed")
    return BackendChoice("pyav", "cpu", f"DALI cannot decode {codec} on {device}")


def log_choice_once(codec: str, choice: BackendChoice) -> None:
    """Log which backend serves `codec`, once per (codec, backend, device) in this process."""
    key = (codec, choice.backend, choice.device)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(choice.describe(codec))


class VideoDecoders:
    """Holds the decoders of one process, created on first use (DALI pipelines are per process)."""

    def __init__(self, backend: str = "auto", dali_device: str = "auto", dali_threads: int = 2, pyav_threads: int = 1):
        self.backend = backend
        self.dali_device = resolve_dali_device(dali_device)
        self.dali_threads = dali_threads
        self.pyav_threads = pyav_threads
        self._dali: DaliDecoder | None = None
        self._pyav: PyAVDecoder | None = None

    def choose(self, codec: str, colour: ColourSpec | None = None) -> BackendChoice:
        return select_backend(codec, self.backend, self.dali_device, colour=colour)

    def decoder(self, choice: BackendChoice):
        if choice.backend == "dali":
            if self._dali is None:
                # on GPU the device is resolved when the pipeline is built, in the process that decodes
                self._dali = DaliDecoder(choice.device, num_threads=self.dali_threads)
            return self._dali
        if self._pyav is None:
            self._pyav = PyAVDecoder(self.pyav_threads)
        return self._pyav

    @property
    def uses_gpu(self) -> bool:
        return self.backend != "pyav" and self.dali_device == "gpu" and dali_available()
