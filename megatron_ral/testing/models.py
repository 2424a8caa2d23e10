"""Tiny Qwen2.5-VL references for tests and benchmarks: HF model, weights and synthetic prompts.

Everything is generated locally and seeded: an HF config from the tiny-checkpoint presets, the
seeded weights of megatron_ral.tiny.checkpoint (released key naming), the matching eager fp32
``Qwen2_5_VLForConditionalGeneration``, and prompts mixing text with image / video placeholder
runs plus random pixel patches of the right shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Special-token ids used with the in-memory configs (any ids < vocab work; these are the ids the
# tiny tokenizer assigns).
TOKEN_IDS = {
    "<|endoftext|>": 1000,
    "<|im_start|>": 1001,
    "<|im_end|>": 1002,
    "<|vision_start|>": 1009,
    "<|vision_end|>": 1010,
    "<|image_pad|>": 1012,
    "<|video_pad|>": 1013,
}
VOCAB_SIZE = 1024
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_hf_config(preset: str = "tiny", config_overrides: dict | None = None, vocab_size: int = VOCAB_SIZE):
    """Qwen2_5_VLConfig of a tiny-checkpoint preset ('tiny': GQA 2:1, 3 layers, untied;
    'small': GQA 4:1, 4 layers, tied)."""
    from megatron_ral.tiny.checkpoint import build_config

    return build_config(preset, config_overrides, vocab_size=vocab_size, token_ids=TOKEN_IDS)


def hf_state_dict(hf_config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights in released naming (the same bytes make_tiny_checkpoint writes)."""
    from megatron_ral.tiny.checkpoint import random_state_dict

    return random_state_dict(hf_config, seed=seed, dtype=dtype)


def seeded_megatron_model(preset: str = "tiny", seed: int = 0, parallel=None, **build_kwargs):
    """This rank's fp32 Qwen25VLModel for a tiny preset, with the seeded HF weights of
    ``hf_state_dict(cfg, seed)`` (megatron parallel state must be initialised)."""
    from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights
    from megatron_ral.models.qwen25vl.provider import build_model

    cfg = tiny_hf_config(preset)
    model = build_model(cfg, parallel, dtype=torch.float32, **build_kwargs)
    load_hf_weights(model, hf_state_dict(cfg, seed=seed))
    return model


def _in_memory_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def hf_reference_model(hf_config, state: dict[str, torch.Tensor]):
    """Eager-attention fp32 HF model holding ``state`` (released naming)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32
    )
    mapped = {_in_memory_name(k): v for k, v in state.items()}
    if hf_config.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not (hf_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"HF reference load: missing {missing}, unexpected {unexpected}")
    return model.eval()


@dataclass
class Prompt:
    """A batch of token ids with its vision inputs, as the processor would return it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def hf_inputs(self, image_token_id: int, video_token_id: int) -> dict:
        out = self.model_inputs()
        ids = self.input_ids
        out["mm_token_type_ids"] = (ids == image_token_id).int() + 2 * (ids == video_token_id).int()
        return out


def _vision_run(token_id: int, grid: tuple[int, int, int], merge: int = 2) -> list[int]:
    t, h, w = grid
    return [TOKEN_IDS["<|vision_start|>"]] + [token_id] * (t * h * w // merge**2) + [TOKEN_IDS["<|vision_end|>"]]


def make_prompt(
    segments: list,
    seed: int = 0,
    second_per_grid_ts: list[float] | None = None,
    pad_to: int | None = None,
    padding_side: str = "left",
) -> Prompt:
    """One or more rows built from segments: an int n (n random text tokens), ("image", (t,h,w)) or
    ("video", (t,h,w)) with (t,h,w) the patch grid. ``segments`` is a list of rows (list of lists)
    or a single row. Rows are padded with <|endoftext|> to the longest (or ``pad_to``)."""
    rows = segments if segments and isinstance(segments[0], list) else [segments]
    gen = torch.Generator().manual_seed(seed)
    ids_rows, images, videos = [], [], []
    for row in rows:
        ids: list[int] = []
        for seg in row:
            if isinstance(seg, int):
                ids += torch.randint(0, 900, (seg,), generator=gen).tolist()
            elif seg[0] == "image":
                images.append(tuple(seg[1]))
                ids += _vision_run(TOKEN_IDS["<|image_pad|>"], seg[1])
            elif seg[0] == "video":
                videos.append(tuple(seg[1]))
                ids += _vision_run(TOKEN_IDS["<|video_pad|>"], seg[1])
            else:
                raise ValueError(f"bad segment {seg!r}")
        ids_rows.append(ids)
    length = max(pad_to or 0, max(len(r) for r in ids_rows))
    pad = TOKEN_IDS["<|endoftext|>"]
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(ids_rows):
        if padding_side == "left":
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            mask[b, length - len(ids):] = 1
        else:
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1

    def pixels(grids):
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, PATCH_DIM, generator=gen)

    prompt = Prompt(input_ids=input_ids, attention_mask=mask)
    if images:
        prompt.pixel_values = pixels(images)
        prompt.image_grid_thw = torch.tensor(images, dtype=torch.long)
    if videos:
        prompt.pixel_values_videos = pixels(videos)
        prompt.video_grid_thw = torch.tensor(videos, dtype=torch.long)
        secs = second_per_grid_ts if second_per_grid_ts is not None else [1.0] * len(videos)
        prompt.second_per_grid_ts = torch.tensor(secs, dtype=torch.float32)
    return prompt
