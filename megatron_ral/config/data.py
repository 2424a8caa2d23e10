"""Configuration of the video/image input pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

# Pixel limits are counted in 28x28 cells: one cell is one LM token after the 2x2 spatial merge.
CELL = 28 * 28


@dataclass
class DataConfig:
    """Data pipeline settings.

    Defaults follow the RAL paper's training setup (video at 1 fps, at most 128 frames, at most
    128*28*28 pixels per frame; images between 128*28*28 and 5120*28*28 pixels). The plain
    qwen-vl-utils defaults are fps=2.0, max_frames=768, video_max_pixels=768*28*28.
    """

    # Record files (Video-R1 format, JSON array or JSON lines). Several files are concatenated.
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # Directory that the records' relative `path` fields are resolved against.
    media_root: str = ""
    # Use only the first N records of the (concatenated) file list; None = all.
    max_records: int | None = None

    # Prompt template: "think" (reason in <think></think>, answer in <answer></answer>) or
    # "answer_only" (RAL-zero: answer directly inside <answer></answer>).
    template: str = "think"
    # System message; None keeps the chat template's own default.
    system_prompt: str | None = None
    # Drop prompts longer than this many tokens (vision tokens included); None = no limit.
    max_prompt_tokens: int | None = None

    # Video frame sampling (qwen-vl-utils rules).
    fps: float = 1.0
    min_frames: int = 4
    max_frames: int = 128
    # Per-frame pixel limits and the pixel budget shared by all frames of one video.
    video_min_pixels: int = 128 * CELL
    video_max_pixels: int = 128 * CELL
    video_total_pixels: int = int(128000 * CELL * 0.9)
    # Optional LM-token budget per video; longer videos get fewer frames (still spread over the
    # whole video), never truncated to their first frames. None = no budget beyond the above.
    max_video_tokens: int | None = None

    # Image pixel limits.
    image_min_pixels: int = 128 * CELL
    image_max_pixels: int = 5120 * CELL

    # Video decoding backend: "auto" (DALI where it can decode the codec on this device, PyAV
    # otherwise), "dali" or "pyav".
    video_backend: str = "auto"
    # Y'CbCr matrix of a video stream without a matrix tag (tagged streams use their tag): "auto" =
    # BT.601 below HD, BT.709 from 1280 wide or 577 high (as ffplay/mpv display them); "bt601" = what
    # FFmpeg's converter (torchvision's, decord's readers) assumes for every untagged stream; "bt709".
    video_untagged_matrix: str = "auto"
    # DALI device: "auto" (GPU when CUDA is available), "cpu" or "gpu".
    dali_device: str = "auto"
    dali_threads: int = 2
    # At most this many DataLoader workers when DALI decodes on the GPU: every worker process holds its
    # own CUDA context, NVDEC decoder and DALI memory pools on the rank's GPU (README, "Data"), so
    # data.num_workers is capped to it there. 0 workers = decode in the training process.
    dali_gpu_workers: int = 1

    # Background decoding: DataLoader worker processes (0 = decode in the training process) and
    # the number of batches kept decoded ahead of the trainer.
    num_workers: int = 2
    prefetch_factor: int = 2

    shuffle: bool = True
    seed: int = 1234

    # Bad input: a failing sample is skipped and counted. Training stops when the failed share of
    # the recent draws exceeds this fraction; the window is the larger of `failure_window` draws
    # and the draws of the current batch.
    max_failure_fraction: float = 0.05
    failure_window: int = 100

    def validate(self) -> None:
        """Raise ValueError with one clear message for the first invalid field."""
        if self.template not in ("think", "answer_only"):
            raise ValueError(f"data.template must be 'think' or 'answer_only', got {self.template!r}")
        if self.video_backend not in ("auto", "dali", "pyav"):
            raise ValueError(f"data.video_backend must be auto|dali|pyav, got {self.video_backend!r}")
        if self.video_untagged_matrix not in ("auto", "bt601", "bt709"):
            raise ValueError(f"data.video_untagged_matrix must be auto|bt601|bt709, got {self.video_untagged_matrix!r}")
        if self.dali_device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"data.dali_device must be auto|cpu|gpu, got {self.dali_device!r}")
        if self.fps <= 0:
            raise ValueError(f"data.fps must be > 0, got {self.fps}")
        if self.min_frames < 1 or self.max_frames < 2 or self.min_frames > self.max_frames:
            raise ValueError(
                f"data.min_frames/max_frames must satisfy 1 <= min <= max, max >= 2; got {self.min_frames}/{self.max_frames}"
            )
        for name in ("video_min_pixels", "video_max_pixels", "video_total_pixels", "image_min_pixels", "image_max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError("data.image_min_pixels must not exceed data.image_max_pixels")
        if self.max_video_tokens is not None and self.max_video_tokens < 1:
            raise ValueError(f"data.max_video_tokens must be >= 1 or null, got {self.max_video_tokens}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.dali_gpu_workers < 0:
            raise ValueError(f"data.dali_gpu_workers must be >= 0, got {self.dali_gpu_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"data.max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        if self.failure_window < 1:
            raise ValueError(f"data.failure_window must be >= 1, got {self.failure_window}")
