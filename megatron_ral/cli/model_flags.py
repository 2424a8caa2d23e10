"""What the model tools share (generate, dump_attention, evaluate): the checked model flags, the dtype flag,
and running a piece of work on the platform.

:func:`check_model_flags` checks what a model tool is given (the checkpoint is a Megatron one with its HF
files, TP x PP matches the process count and the model, the media demux) before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_ckpt, add_dtype, add_layout, add_media


@dataclass(frozen=True)
class ModelFlags:
    """The checked model flags: the checkpoint, the directory of its HF files, the layout."""

    ckpt: str
    model_dir: Path
    num_layers: int
    tp: int
    pp: int
    pp_split: list[int] | None
    cp: int = 1

    def parallel(self):
        """The ParallelConfig of the run (an uneven PP split balanced when none was given)."""
        from megatron_ral.config.schema import ParallelConfig
        from megatron_ral.models.qwen25vl.provider import balanced_layer_split

        split = self.pp_split if self.pp_split is not None else balanced_layer_split(self.num_layers, self.pp)
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              context_parallel_size=self.cp, pipeline_layer_split=split)


def add_model_flags(p: ToolParser, dtype_default: str = "auto", context_parallel: bool = False) -> None:
    """--ckpt, --tp, --pp, --pp-split, --dtype, --prompt, --image / --video (and --cp for a tool whose forward
    splits the sequence over context-parallel ranks)."""
    add_ckpt(p)
    add_layout(p)
    if context_parallel:
        p.add_argument("--cp", type=int, default=1,
                       help="context parallel size: the sequence is split over CP ranks (processes = TP x PP x CP)")
    add_dtype(p, dtype_default)
    p.add_argument("--prompt", required=True, help="user text (after the image / video)")
    add_media(p)


def check_model_flags(args) -> ModelFlags:
    """Checkpoint, layout and media checks of a model tool (no torch): one line per mistake."""
    from megatron_ral.checkpoint.locate import find_hf_config_dir, megatron_checkpoint, processor_dir
    from megatron_ral.models.qwen25vl.arch import arch_from_config, load_hf_config

    cp = getattr(args, "cp", 1)
    check.process_count(args.tp, args.pp, cp)  # first: the same answer on every rank of a mis-launched job
    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    model_dir = processor_dir(find_hf_config_dir(dist_dir, args.ckpt), "--ckpt")
    arch = arch_from_config(load_hf_config(model_dir), str(model_dir / "config.json"))
    split = check.layout(args.tp, args.pp, args.pp_split, num_layers=arch.num_layers,
                         num_heads=arch.num_attention_heads, num_kv_heads=arch.num_query_groups, cp=cp)
    check.media_files(args.image, args.video)
    return ModelFlags(args.ckpt, model_dir, arch.num_layers, args.tp, args.pp, split, cp)


def torch_dtype(name: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def run_on_platform(parallel, seed: int, work):
    """initialize, ``work(info)``, destroy; after a failure in a multi-rank job nothing is torn down (no
    collective on the way out: :func:`megatron_ral.cli.entry.run_main` ends the process)."""
    from megatron_ral.platform import destroy, initialize

    info = initialize(parallel, seed=seed)
    try:
        result = work(info)
    except BaseException:
        if info.world_size == 1:
            destroy()
        raise
    destroy()
    return result
