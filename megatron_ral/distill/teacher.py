"""The teacher runner: a forward-only second Qwen2.5-VL on the student's ranks (paper §3.5).

    teacher = build_teacher(TeacherConfig.from_config(cfg.algorithm), cfg.parallel, student_hf_dir, run_dir,
                            dtype=dtype, backend=cfg.model.layer_spec)
    with teacher.active():                          # weights on the device for the pass (placement "host")
        ... a forward-only pipeline schedule over teacher.chunks, capture with teacher.capture ...

The teacher is a megatron-core Qwen25VLModel built from its own HF config (its layer count, width, head
and KV-head counts, tied or untied embeddings), with the student's tensor-parallel size and process groups
and, under pipeline parallelism, its own split of its layers over the same stages
(``algorithm.teacher_pipeline_layer_split``; null = as even as possible, extra layers first): its first
stage holds its vision tower and embedding on the student's first-stage ranks, its last stage its output
layer and last decoder layer on the student's last-stage ranks, so the teacher's attention rows and
logits land where the student's loss is computed. Weights come from ``algorithm.teacher_load`` (a Megatron
checkpoint, any layout) or ``algorithm.teacher_hf_path`` converted once into ``RUN_DIR/teacher_mcore``
(``checkpoint.initial_weights``, the helper the student's weights use too).

Forward only: every parameter has ``requires_grad`` False, the model stays in eval mode, no DDP wrapper and
no optimizer state exist for it (the memory failure peers hit when a teacher was wrapped for training);
the vision tower is frozen like the student's. ``algorithm.teacher_placement``: "device" keeps the weights
resident; "host" keeps them in host memory between teacher passes and moves them in for each pass
(``distill.placement``).

Before anything is built, :func:`~megatron_ral.distill.compat.check_teacher_compatible` checks that the
teacher reads the student's positions one to one (vocabulary, tokenizer, special tokens, chat template,
vision patching).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_ral.distill.compat import check_teacher_compatible

log = logging.getLogger(__name__)

PLACEMENTS = ("device", "host")
CONVERSION_DIR = "teacher_mcore"


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher comes from and how it is placed (``algorithm.teacher_*``)."""

    hf_path: str = ""
    load: str = ""
    placement: str = "device"
    pipeline_layer_split: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"teacher placement must be one of {PLACEMENTS}, got {self.placement!r}")

    @classmethod
    def from_config(cls, algorithm) -> "TeacherConfig":
        split = algorithm.teacher_pipeline_layer_split
        return cls(hf_path=algorithm.teacher_hf_path, load=algorithm.teacher_load,
                   placement=algorithm.teacher_placement, pipeline_layer_split=None if split is None else tuple(split))

    @property
    def key(self) -> str:
        """The config key that names the teacher (for messages)."""
        return "algorithm.teacher_load" if self.load else "algorithm.teacher_hf_path"


def teacher_layer_split(num_layers: int, pp: int, split: tuple[int, ...] | list[int] | None) -> list[int] | None:
    """Teacher layers per pipeline stage: ``split`` when given (checked), else as even as possible (None
    when ``pp`` divides the layer count: megatron's even split)."""
    from megatron_ral.models.qwen25vl.provider import balanced_layer_split

    if split is None:
        return balanced_layer_split(num_layers, pp)
    split = [int(n) for n in split]
    if len(split) != pp or sum(split) != num_layers or min(split) < 1:
        raise ValueError(f"teacher pipeline split {split} must have {pp} entries >= 1 summing to its "
                         f"{num_layers} layers")
    return split


class Teacher:
    """This rank's teacher stage: the model (a one-chunk list for the schedule), its attention capture and
    its placement."""

    def __init__(self, model, placement: str = "device", source: str = "") -> None:
        from megatron_ral.attention.capture import AttentionCapture
        from megatron_ral.distill.placement import HostOffload

        self.model = model
        self.chunks = [model]
        self.source = source
        self.placement = placement
        self.capture = AttentionCapture(model)
        self._offload = HostOffload(model) if placement == "host" else None

    @property
    def pre_process(self) -> bool:
        return bool(self.model.pre_process)

    def nbytes(self) -> int:
        """Bytes of this rank's teacher weights (wherever they are kept)."""
        if self._offload is not None:
            return self._offload.nbytes()
        return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))

    def device_bytes(self) -> int:
        """Bytes of teacher weights on the device right now (0 between passes with placement "host")."""
        if self._offload is not None:
            return self._offload.device_bytes()
        return self.nbytes()

    @contextlib.contextmanager
    def active(self) -> Iterator["Teacher"]:
        """The teacher ready for a forward inside the block (weights moved in for placement "host")."""
        block = self._offload.resident() if self._offload is not None else contextlib.nullcontext()
        with block:
            yield self


def teacher_weights(tc: TeacherConfig, run_dir: str | os.PathLike) -> Path:
    """The teacher's Megatron checkpoint: ``teacher_load``, else ``teacher_hf_path`` converted once into
    RUN_DIR/teacher_mcore (rank 0 converts, the other ranks wait; a current conversion is reused).
    Collective when a conversion may be needed."""
    if tc.load:
        return Path(tc.load)
    from megatron_ral.checkpoint.initial_weights import initial_weights_dir

    return Path(initial_weights_dir("", tc.hf_path, Path(run_dir) / CONVERSION_DIR))


def build_teacher(tc: TeacherConfig, parallel, student_hf_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
                  dtype, backend: str = "auto", attention_backend: str = "auto",
                  rope_text_after_vision: str = "max_position") -> Teacher:
    """Check the teacher against the student (``student_hf_dir``), then build this rank's frozen teacher
    stage at the student's TP size with the teacher's own pipeline split (see the module docstring)."""
    from megatron_ral.inference.loading import hf_files_dir, load_model
    from megatron_ral.models.qwen25vl.provider import LMArchitecture, load_hf_config

    # the files are there before any conversion: an incompatible teacher is refused before it is converted
    check_teacher_compatible(student_hf_dir, hf_files_dir(tc.load) if tc.load else tc.hf_path, tc.key)
    weights = teacher_weights(tc, run_dir)
    hf_dir = hf_files_dir(weights)
    arch = LMArchitecture.from_hf(load_hf_config(str(hf_dir)))
    pp = getattr(parallel, "pipeline_model_parallel_size", 1)
    split = teacher_layer_split(arch.num_layers, pp, tc.pipeline_layer_split)
    teacher_parallel = dataclasses.replace(parallel, pipeline_layer_split=split)
    model = load_model(weights, teacher_parallel, dtype=dtype, backend=backend, attention_backend=attention_backend,
                       rope_text_after_vision=rope_text_after_vision)
    model.requires_grad_(False)
    model.eval()
    teacher = Teacher(model, tc.placement, source=str(weights))
    log.info("teacher %s: %d layers (this stage: %d), hidden %d, %d heads / %d KV heads, %s embeddings, "
             "%.1f MiB on this rank, placement %s", weights, arch.num_layers, len(model.language_model.decoder.layers),
             arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
             "tied" if arch.tie_word_embeddings else "untied", teacher.nbytes() / 2**20, tc.placement)
    return teacher
