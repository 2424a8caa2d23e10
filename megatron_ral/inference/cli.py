"""Command line of generation (tools/generate.py, ``megatron-ral-generate``) and what the model tools share.

    torchrun --nproc-per-node N tools/generate.py --ckpt CKPT --tp T --pp P --prompt TEXT
        [--image FILE | --video FILE] [--max-new-tokens K] [--greedy | --temperature X --top-p Y --top-k K]
        [--seed S] [--dtype auto|fp32|bf16] [--pp-split A,B] [--json]

:func:`check_model_flags` checks what a model tool is given (the checkpoint is a Megatron one with its HF
files, TP x PP matches the process count and the model, the media demux) before torch is imported;
:func:`build_prompt` then decodes the media and renders the chat prompt before the model is loaded, so
every input error costs a fraction of a second, not a model load.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from megatron_ral import input_checks as check
from megatron_ral.arguments import ToolParser, add_ckpt, add_dtype, add_json, add_layout, add_media
from megatron_ral.entry import prog_name, run_main

if TYPE_CHECKING:
    from megatron_ral.inference.prompts import PromptInput

DEFAULT_MAX_NEW_TOKENS = 128


def build_prompt(model_dir: str | os.PathLike, text: str, *, image: str | None = None, video: str | None = None,
                 processor=None) -> tuple["PromptInput", object]:
    """One user turn (the image / video first, then ``text``) rendered with the checkpoint's chat
    template and the generation prompt, as the data pipeline builds rollout prompts."""
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.single import preprocess_single
    from megatron_ral.inference.prompts import PromptInput

    model_dir = str(model_dir)
    processor = processor or QwenVLProcessor.from_pretrained(model_dir)
    if image is not None or video is not None:
        inputs = preprocess_single(model_dir, image=image, video=video, prompt=text, processor=processor)
        return PromptInput.from_inputs(inputs), processor
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return PromptInput(processor.encode_prompt(messages, [])), processor


# --- what the model tools share ---------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFlags:
    """The checked model flags: the checkpoint, the directory of its HF files, the layout."""

    ckpt: str
    model_dir: Path
    num_layers: int
    tp: int
    pp: int
    pp_split: list[int] | None

    def parallel(self):
        """The ParallelConfig of the run (an uneven PP split balanced when none was given)."""
        from megatron_ral.config.schema import ParallelConfig
        from megatron_ral.models.qwen25vl.provider import balanced_layer_split

        split = self.pp_split if self.pp_split is not None else balanced_layer_split(self.num_layers, self.pp)
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              pipeline_layer_split=split)


def add_model_flags(p: ToolParser, dtype_default: str = "auto") -> None:
    """--ckpt, --tp, --pp, --pp-split, --dtype, --prompt, --image / --video."""
    add_ckpt(p)
    add_layout(p)
    add_dtype(p, dtype_default)
    p.add_argument("--prompt", required=True, help="user text (after the image / video)")
    add_media(p)


def check_model_flags(args) -> ModelFlags:
    """Checkpoint, layout and media checks of a model tool (no torch): one line per mistake."""
    from megatron_ral.checkpoint.locate import find_hf_config_dir, megatron_checkpoint, processor_dir
    from megatron_ral.checkpoint.qwen25vl_arch import arch_from_config, load_hf_config

    check.process_count(args.tp, args.pp)  # first: the same answer on every rank of a mis-launched job
    dist_dir = megatron_checkpoint(args.ckpt, "--ckpt")
    model_dir = processor_dir(find_hf_config_dir(dist_dir, args.ckpt), "--ckpt")
    arch = arch_from_config(load_hf_config(model_dir), str(model_dir / "config.json"))
    split = check.layout(args.tp, args.pp, args.pp_split, num_layers=arch.num_layers,
                         num_heads=arch.num_attention_heads, num_kv_heads=arch.num_query_groups)
    check.media_files(args.image, args.video)
    return ModelFlags(args.ckpt, model_dir, arch.num_layers, args.tp, args.pp, split)


def torch_dtype(name: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def run_on_platform(parallel, seed: int, work):
    """initialize, ``work(info)``, destroy; after a failure in a multi-rank job nothing is torn down (no
    collective on the way out: :func:`megatron_ral.entry.run_main` ends the process)."""
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


# --- generate ---------------------------------------------------------------------------------------

def parser() -> ToolParser:
    p = ToolParser(
        prog=prog_name("generate.py"),
        description="Generate a response with the Megatron Qwen2.5-VL model from a distributed checkpoint "
                    "(KV cache, TP/PP).\nAlso runs as a plain single process when TP x PP = 1.",
        epilog="Run under torchrun for TP x PP > 1: torchrun --nproc-per-node N tools/generate.py --tp T --pp P ...")
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="response length cap")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (excludes the sampling flags)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, >= 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_json(p, "the result (token_ids, text, finish_reason, prompt_length)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check.sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   max_new_tokens=args.max_new_tokens)
    flags = check_model_flags(args)

    from megatron_ral.config.schema import GenerationConfig
    from megatron_ral.inference.generate import generate
    from megatron_ral.inference.loading import load_model, stop_token_ids

    config = GenerationConfig(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        top_k=0 if args.top_k is None else args.top_k,
        max_new_tokens=args.max_new_tokens,
    )
    prompt, processor = build_prompt(flags.model_dir, args.prompt, image=args.image, video=args.video)

    def work(info):
        model = load_model(args.ckpt, flags.parallel(), dtype=torch_dtype(args.dtype))
        (response,), = generate(model, [prompt], config, greedy=args.greedy, seed=args.seed,
                                stop_token_ids=stop_token_ids(flags.model_dir, processor.tokenizer))
        if info.rank == 0:
            ids = response.token_ids.tolist()
            text = processor.decode(ids, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"token_ids": ids, "text": text, "finish_reason": response.finish_reason,
                                  "prompt_length": response.prompt_length}))
            else:
                print(text)
            sys.stdout.flush()

    run_on_platform(flags.parallel(), args.seed, work)
    return 0


def cli() -> NoReturn:
    run_main(prog_name("generate.py"), main)
