"""The library side of tools/generate.py: build one chat prompt, generate, format the result."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_ral.inference.prompts import PromptInput

DEFAULT_MAX_NEW_TOKENS = 128


def build_prompt(model_dir: str | os.PathLike, text: str, *, image: str | None = None, video: str | None = None,
                 processor=None) -> tuple[PromptInput, object]:
    """One user turn (the image / video first, then ``text``) rendered with the checkpoint's chat
    template and the generation prompt, as the data pipeline builds rollout prompts."""
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.single import preprocess_single

    model_dir = str(model_dir)
    processor = processor or QwenVLProcessor.from_pretrained(model_dir)
    if image is not None or video is not None:
        inputs = preprocess_single(model_dir, image=image, video=video, prompt=text, processor=processor)
        return PromptInput.from_inputs(inputs), processor
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return PromptInput(processor.encode_prompt(messages, [])), processor


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate a response with the megatron Qwen2.5-VL model (KV cache, TP/PP).",
        epilog="Run under torchrun for TP/PP > 1: torchrun --nproc-per-node N tools/generate.py --tp T --pp P ...")
    p.add_argument("--ckpt", required=True, help="megatron dist checkpoint (tools/convert_hf_to_megatron.py output)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--prompt", required=True, help="user text (after the image / video)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", help="image file")
    media.add_argument("--video", help="video file")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (token_ids, text) on rank 0")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.greedy and (args.temperature is not None or args.top_p is not None):
        parser().error("--greedy excludes --temperature / --top-p")
    if args.max_new_tokens < 1:
        parser().error("--max-new-tokens must be >= 1")
    for path, flag in ((args.image, "--image"), (args.video, "--video")):
        if path is not None and not os.path.isfile(path):
            parser().error(f"{flag} {path}: no such file")

    from megatron_ral.config.schema import GenerationConfig, ParallelConfig
    from megatron_ral.inference.generate import generate
    from megatron_ral.inference.loading import hf_files_dir, load_model, stop_token_ids
    from megatron_ral.models.qwen25vl.provider import LMArchitecture, balanced_layer_split, load_hf_config
    from megatron_ral.platform import destroy, initialize

    model_dir = hf_files_dir(args.ckpt)
    try:
        # PP that does not divide the layer count: as even a split as possible
        split = balanced_layer_split(LMArchitecture.from_hf(load_hf_config(str(model_dir))).num_layers, args.pp)
    except ValueError as e:
        parser().error(str(e))
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              pipeline_layer_split=split)
    try:
        info = initialize(parallel, seed=args.seed)
    except ValueError as e:  # e.g. the process count does not match TP x PP
        parser().error(str(e))
    try:
        model = load_model(args.ckpt, parallel)
        prompt, processor = build_prompt(model_dir, args.prompt, image=args.image, video=args.video)
        config = GenerationConfig(
            temperature=1.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            max_new_tokens=args.max_new_tokens,
        )
        (response,), = generate(model, [prompt], config, greedy=args.greedy, seed=args.seed,
                                stop_token_ids=stop_token_ids(model_dir, processor.tokenizer))
        if info.rank == 0:
            ids = response.token_ids.tolist()
            text = processor.decode(ids, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"token_ids": ids, "text": text, "finish_reason": response.finish_reason,
                                  "prompt_tokens": response.prompt_length}))
            else:
                print(text)
            sys.stdout.flush()
    finally:
        destroy()
    return 0

