"""Generation test and benchmark helpers: a converted tiny checkpoint, prompts, HF references.

Everything is generated locally: ``converted_checkpoint`` writes a seeded tiny HF checkpoint and its
megatron dist-checkpoint conversion; ``standard_prompts`` gives a text, an image and a video prompt
(placeholder runs with random pixels, video at 0.5 s per temporal grid step); ``hf_generate`` runs
transformers' ``generate()`` on one prompt as the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_ral.inference.prompts import PromptInput


def converted_checkpoint(root: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                         config_overrides: dict | None = None) -> tuple[Path, Path]:
    """(hf_dir, megatron_dir) under ``root``; reused when already there."""
    from megatron_ral.checkpoint.convert import hf_to_megatron
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    root = Path(root)
    hf_dir, mc_dir = root / "hf", root / "mcore"
    if not (hf_dir / "config.json").is_file():
        make_tiny_checkpoint(hf_dir, preset=preset, seed=seed, config_overrides=config_overrides)
    if not (mc_dir / "config.json").is_file():
        hf_to_megatron(hf_dir, mc_dir, progress=False)
    return hf_dir, mc_dir


def prompt_from_segments(segments: list, seed: int = 0, second_per_grid_ts: list[float] | None = None) -> PromptInput:
    """One prompt from testing segments: n random text tokens, ("image", (t,h,w)), ("video", (t,h,w))."""
    from megatron_ral.testing.models import make_prompt

    p = make_prompt([segments], seed=seed, second_per_grid_ts=second_per_grid_ts)
    return PromptInput.from_inputs(p.model_inputs())


def standard_prompts() -> dict[str, PromptInput]:
    """A text, an image and a video prompt (video temporal extent below its spatial extent, where
    every rope-index convention agrees)."""
    return {
        "text": prompt_from_segments([11], seed=1),
        "image": prompt_from_segments([6, ("image", (1, 4, 6)), 5], seed=2),
        "video": prompt_from_segments([4, ("video", (4, 8, 8)), 6], seed=3, second_per_grid_ts=[0.5]),
    }


def load_hf_model(hf_dir: str | os.PathLike):
    """Eager fp32 transformers reference model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(hf_dir), attn_implementation="eager", dtype=torch.float32).eval()


def hf_inputs(prompt: PromptInput, image_token_id: int, video_token_id: int) -> dict:
    ids = prompt.input_ids[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "mm_token_type_ids": (ids == image_token_id).int() + 2 * (ids == video_token_id).int()}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        v = getattr(prompt, k)
        if v is not None:
            out[k] = v
    return out


@torch.no_grad()
def hf_generate(hf_model, prompt: PromptInput, max_new_tokens: int, stop_token_ids: list[int], **kwargs) -> list[int]:
    """transformers generate() on one prompt: the generated ids (greedy unless kwargs say otherwise)."""
    cfg = hf_model.config
    inputs = hf_inputs(prompt, cfg.image_token_id, cfg.video_token_id)
    kwargs.setdefault("do_sample", False)
    out = hf_model.generate(
        **inputs, max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=list(stop_token_ids), pad_token_id=stop_token_ids[0], **kwargs)
    return out[0, prompt.input_ids.numel():].tolist()


@torch.no_grad()
def full_forward_next_logits(model, prompt: PromptInput, generated: list[int]) -> torch.Tensor:
    """Logits (V,) after prompt + generated tokens from a plain full forward (no cache; single stage)."""
    ids = torch.cat([prompt.input_ids, torch.tensor(generated, dtype=torch.long)])[None]
    logits = model(input_ids=ids, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                   pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw,
                   second_per_grid_ts=prompt.second_per_grid_ts, runtime_gather_output=True)
    return logits[0, -1].float()


def run_generate_tool(repo_root: str | os.PathLike, args: list[str], nproc: int = 1, expect_rc: int = 0,
                      timeout: float = 600):
    """Run tools/generate.py (plain python for nproc 1, else torchrun --nproc-per-node nproc) with
    OMP_NUM_THREADS=1 and offline HF; returns the CompletedProcess after checking the exit code."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if nproc == 1:
        cmd = [sys.executable, "tools/generate.py", *args]
    else:
        from megatron_ral.platform.launch_env import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "tools/generate.py", *args]
    proc = subprocess.run(cmd, cwd=str(repo_root), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f"exit code {proc.returncode} != {expect_rc}\n{proc.stderr[-4000:]}")
    return proc


def tool_json(proc) -> dict:
    """The one JSON line a --json tool run printed on stdout."""
    import json

    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise AssertionError(f"expected one stdout line, got {len(lines)}:\n{proc.stdout[-2000:]}")
    return json.loads(lines[0])


def greedy_tool_and_hf(repo_root: str | os.PathLike, hf_dir, mc_dir, text: str, max_new_tokens: int,
                       layout_args: list[str] = (), nproc: int = 1, image: str | None = None,
                       video: str | None = None):
    """Run tools/generate.py greedily on ``mc_dir`` and HF generate() on ``hf_dir`` for the same chat
    prompt; returns (tool JSON, HF token ids, the prompt, the processor)."""
    from megatron_ral.inference.prompts import build_prompt
    from megatron_ral.inference.loading import stop_token_ids

    media = (["--image", image] if image else []) + (["--video", video] if video else [])
    out = tool_json(run_generate_tool(repo_root, ["--ckpt", str(mc_dir), *layout_args, "--prompt", text, *media,
                                                  "--max-new-tokens", str(max_new_tokens), "--greedy", "--json"],
                                      nproc=nproc))
    prompt, processor = build_prompt(hf_dir, text, image=image, video=video)
    ids = hf_generate(load_hf_model(hf_dir), prompt, max_new_tokens, stop_token_ids(hf_dir, processor.tokenizer))
    return out, ids, prompt, processor
