"""Record -> model-ready sample: media decoded and preprocessed, prompt tokenized, SFT target masked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_ral.config.data import DataConfig
from megatron_ral.data.errors import DataError
from megatron_ral.data.media import MediaOptions, image_input, video_input
from megatron_ral.data.pixels import VisionInput
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.prompts import get_template, sft_target, user_messages
from megatron_ral.data.records import Record
from megatron_ral.data.video.backend import VideoDecoders

MODES = ("prompt", "sft")


@dataclass
class Sample:
    """One example.

    input_ids: prompt tokens ("prompt" mode) or prompt + target tokens ("sft" mode), vision pads expanded.
    loss_mask: "sft" mode only; 1 where input_ids[t] is a target token (the loss on token t uses the
    logits at t-1), 0 on the prompt.
    """

    record: Record
    input_ids: torch.Tensor
    prompt_length: int
    vision: list[VisionInput]
    loss_mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A record that could not be turned into a sample (picklable, crosses worker processes)."""

    reason: str
    source: str   # media file or record file:line
    detail: str
    record_source: str

    @classmethod
    def from_error(cls, err: DataError, record_source: str) -> "Failure":
        return cls(err.reason, err.source, err.detail, record_source)


class SampleBuilder:
    """Turns records into Samples in `mode` ("prompt" for RL/generation, "sft" for supervised)."""

    def __init__(self, processor: QwenVLProcessor, cfg: DataConfig, mode: str = "prompt"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.processor = processor
        self.cfg = cfg
        self.mode = mode
        self.template = get_template(cfg.template)
        self.opts = MediaOptions.from_config(cfg)
        self._decoders: VideoDecoders | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_decoders"] = None  # decoders (DALI pipelines) are created per process
        return state

    @property
    def decoders(self) -> VideoDecoders:
        if self._decoders is None:
            self._decoders = VideoDecoders(self.cfg.video_backend, self.cfg.dali_device, self.cfg.dali_threads)
        return self._decoders

    @property
    def require_process(self) -> bool:
        return self.mode == "sft" and self.template.name == "think"

    def vision_input(self, record: Record) -> VisionInput:
        path = record.media_path(self.cfg.media_root)
        params = self.processor.params
        if record.data_type == "image":
            return image_input(path, params, self.opts)
        return video_input(path, params, self.opts, self.decoders)

    def build(self, record: Record) -> Sample:
        """Raises DataError (skip reasons) for unusable inputs."""
        vision = self.vision_input(record)
        # Samples leave the (possibly worker) process on the CPU; decoding may have run on the GPU.
        vision.pixel_values = vision.pixel_values.cpu()
        messages = user_messages(record, self.template, self.cfg.system_prompt)
        prompt = self.processor.encode_prompt(messages, [vision])
        if self.cfg.max_prompt_tokens is not None and len(prompt) > self.cfg.max_prompt_tokens:
            raise DataError("prompt_too_long", record.media_path(self.cfg.media_root),
                            f"{len(prompt)} prompt tokens > data.max_prompt_tokens={self.cfg.max_prompt_tokens}")
        if self.mode == "prompt":
            return Sample(record, prompt, len(prompt), [vision])
        target = self.processor.encode_target(sft_target(record, self.template))
        ids = torch.cat([prompt, target])
        mask = torch.zeros(len(ids), dtype=torch.float32)
        mask[len(prompt):] = 1.0
        return Sample(record, ids, len(prompt), [vision], loss_mask=mask)
