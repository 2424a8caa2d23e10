"""Randomly initialised Qwen2.5-VL checkpoints in Hugging Face format, generated locally.

`make_tiny_checkpoint(out_dir)` writes a directory that `transformers` loads offline:
config.json, generation_config.json, model.safetensors (released key naming), a small byte-level BPE
tokenizer carrying the real Qwen2.5-VL special tokens and chat template, and the image/video
preprocessor configs of `Qwen2_5_VLProcessor`.

Weights are drawn from a seeded generator in a fixed key order, so the same seed and config give the
same bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from megatron_ral.tiny.config import PRESETS, TinyConfigError, resolve_spec  # noqa: F401 - PRESETS re-exported
from megatron_ral.tiny.tokenizer import (
    CHAT_TEMPLATE,
    build_tokenizer,
    special_token_ids,
)

# The embedding rows are padded to a multiple of this (the released vocab sizes are multiples of 128).
VOCAB_MULTIPLE = 128

# Released Qwen2.5-VL preprocessor settings.
_IMAGE_MIN_PIXELS = 56 * 56
_IMAGE_MAX_PIXELS = 28 * 28 * 16384
_VIDEO_MIN_PIXELS = 128 * 28 * 28
_VIDEO_MAX_PIXELS = 768 * 28 * 28
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_config(preset: str = "tiny", config_overrides: dict | None = None, vocab_size: int | None = None,
                 token_ids: dict[str, int] | None = None, source: str = "config overrides"):
    """The `Qwen2_5_VLConfig` of a preset, with overrides merged into text_config / vision_config / top level.

    Overrides use Hugging Face's config keys (see `tiny_config.normalize_overrides`); a key or value that
    does not fit raises `TinyConfigError` naming it (``source`` names where the overrides came from).
    Special-token ids always come from the tokenizer (``token_ids``).
    """
    from transformers import Qwen2_5_VLConfig

    text, vision, spec = resolve_spec(preset, config_overrides, source)
    mrope_section = text.pop("mrope_section")
    rope_theta = text.pop("rope_theta")
    if vocab_size is not None:
        text.setdefault("vocab_size", vocab_size)
    ids = token_ids or {}
    text.setdefault("bos_token_id", ids.get("<|endoftext|>"))
    text.setdefault("eos_token_id", ids.get("<|im_end|>"))
    text.setdefault("pad_token_id", ids.get("<|endoftext|>"))
    text["rope_parameters"] = {"rope_type": "default", "type": "mrope", "mrope_section": list(mrope_section),
                               "rope_theta": float(rope_theta)}
    text.setdefault("tie_word_embeddings", spec.get("tie_word_embeddings", False))
    top = {
        "image_token_id": ids.get("<|image_pad|>"),
        "video_token_id": ids.get("<|video_pad|>"),
        "vision_start_token_id": ids.get("<|vision_start|>"),
        "vision_end_token_id": ids.get("<|vision_end|>"),
    }
    top = {k: v for k, v in top.items() if v is not None}
    top.update(spec)
    dtype = top.pop("dtype", top.pop("torch_dtype", "float32"))
    try:
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
    except (TypeError, ValueError) as e:  # transformers' own validation of a value
        raise TinyConfigError(f"{source}: {' '.join(str(e).split())}") from None
    cfg.dtype = dtype
    cfg.text_config.dtype = dtype
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def _released_name(name: str) -> str:
    """transformers-5 in-memory key -> key of the released checkpoints."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator, tied: bool = False) -> torch.Tensor:
    """One seeded tensor (float32). Scales keep activations O(1) so logits and attention are not flat.

    Tied embeddings get std 1/sqrt(hidden): with std 1 the output layer (the same matrix) would give each
    token's own embedding a logit of about ``hidden`` and the untrained model would only ever repeat its
    input (a degenerate sampler: every rollout identical)."""
    if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
            or name.endswith("ln_q.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen) / (math.sqrt(shape[-1]) if tied else 1.0)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def random_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights for `config` under the released key naming (lm_head absent when tied)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = {_released_name(k): v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(int(seed))
    tied = bool(config.tie_word_embeddings)
    return {name: _init_tensor(name, shapes[name], gen, tied).to(dtype) for name in sorted(shapes)}


def _write_processor(out: Path, tokenizer, vision) -> None:
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    common = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                  merge_size=vision.spatial_merge_size, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    image_processor = Qwen2VLImageProcessor(min_pixels=_IMAGE_MIN_PIXELS, max_pixels=_IMAGE_MAX_PIXELS, **common)
    video_processor = Qwen2VLVideoProcessor(min_pixels=_VIDEO_MIN_PIXELS, max_pixels=_VIDEO_MAX_PIXELS, **common)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(out))
    # Standalone files as in the released checkpoints (AutoImageProcessor / AutoVideoProcessor read them too).
    image_processor.save_pretrained(str(out))
    video_processor.save_pretrained(str(out))


def _write_generation_config(out: Path, ids: dict[str, int]) -> None:
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def make_tiny_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                         config_overrides: dict | None = None, source: str = "config overrides") -> Path:
    """Write a random HF Qwen2.5-VL checkpoint (weights, tokenizer, processor) to `out_dir`; return its path.

    config_overrides merges into the preset, in Hugging Face's own config keys (nested `text_config` /
    `vision_config` or the released flat layout, `rope_scaling` / `rope_parameters` for the M-RoPE
    sections; see `tiny_config`). A top-level `dtype` ("float32" default, "bfloat16", "float16") selects
    the dtype the weights are stored in. Nothing is written when the config is refused.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    vocab_size = int(math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    config = build_config(preset, config_overrides, vocab_size=vocab_size, token_ids=ids, source=source)
    if config.text_config.vocab_size < len(tokenizer):
        raise TinyConfigError(f"{source}: vocab_size: {config.text_config.vocab_size} is smaller than the "
                              f"tokenizer ({len(tokenizer)} tokens)")
    dtype = getattr(torch, str(config.dtype).replace("torch.", ""))
    out.mkdir(parents=True, exist_ok=True)  # only once the config is known to be good

    state = random_state_dict(config, seed=seed, dtype=dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    _write_generation_config(out, ids)
    _write_processor(out, tokenizer, config.vision_config)
    return out
