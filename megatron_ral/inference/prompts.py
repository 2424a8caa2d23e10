"""Generation prompts: one unpadded prompt with its own vision inputs, and batch <-> prompt helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class PromptInput:
    """One prompt: ``input_ids`` (L,) with the vision placeholders expanded, and the pixel inputs of
    its images / videos in placeholder order (as the Qwen processor emits them for one sample)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    def __post_init__(self):
        ids = torch.as_tensor(self.input_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"a prompt's input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        self.input_ids = ids.long()
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw go together")
        if (self.pixel_values_videos is None) != (self.video_grid_thw is None):
            raise ValueError("pixel_values_videos and video_grid_thw go together")

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @classmethod
    def from_inputs(cls, inputs: dict) -> "PromptInput":
        """From a single-sample model-input dict (e.g. tools/preprocess.py output; extra keys ignored)."""
        keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            ids = ids.reshape(-1)[mask.reshape(-1).bool()]
        return cls(input_ids=ids, **{k: inputs.get(k) for k in keys})


def _split_items(pixels, grids, counts_tokens, merge: int, name: str):
    """Split concatenated pixel rows / grids of a batch into per-row pieces by placeholder counts."""
    rows = len(counts_tokens)
    if grids is None:
        if any(counts_tokens):
            raise ValueError(f"{name} placeholder tokens but no {name} grid")
        return [None] * rows, [None] * rows, [0] * rows
    grid_list = grids.tolist()
    patches = [int(t * h * w) for t, h, w in grid_list]
    tokens = [p // merge**2 for p in patches]
    pix_out, grid_out, n_items = [], [], []
    item, pix_start = 0, 0
    for need in counts_tokens:
        first, got = item, 0
        while got < need:
            if item >= len(grid_list):
                raise ValueError(f"more {name} placeholder tokens than {name} grids")
            got += tokens[item]
            item += 1
        if got != need:
            raise ValueError(f"{name} placeholders of a row ({need}) do not match its grids ({got} tokens)")
        n_pix = sum(patches[first:item])
        pix_out.append(pixels[pix_start:pix_start + n_pix] if item > first else None)
        grid_out.append(grids[first:item] if item > first else None)
        n_items.append(item - first)
        pix_start += n_pix
    if item != len(grid_list):
        raise ValueError(f"{len(grid_list)} {name} grids but placeholders for only {item}")
    return pix_out, grid_out, n_items


def split_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    **_ignored,
) -> list[PromptInput]:
    """Per-row prompts of a padded processor batch (B, S) (left or right padding; 1 = real token)."""
    rows = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        rows.append(ids[attention_mask[b].bool()] if attention_mask is not None else ids)
    img_pix, img_grid, _ = _split_items(
        pixel_values, image_grid_thw, [int((r == image_token_id).sum()) for r in rows], spatial_merge_size, "image")
    vid_pix, vid_grid, n_vid = _split_items(
        pixel_values_videos, video_grid_thw, [int((r == video_token_id).sum()) for r in rows],
        spatial_merge_size, "video")
    out, v0 = [], 0
    for b, ids in enumerate(rows):
        secs = None
        if n_vid[b]:
            secs = (second_per_grid_ts[v0:v0 + n_vid[b]] if second_per_grid_ts is not None
                    else torch.ones(n_vid[b]))
        v0 += n_vid[b]
        out.append(PromptInput(ids, img_pix[b], img_grid[b], vid_pix[b], vid_grid[b], secs))
    return out


def concat_vision(prompts: list[PromptInput]) -> dict:
    """Pixel values and grids of several prompts concatenated in prompt order (the order in which a
    left-padded batch of these prompts holds its placeholders)."""

    def cat(name):
        parts = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
        return torch.cat(parts, dim=0) if parts else None

    return {k: cat(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}


def build_prompt(model_dir: str | os.PathLike, text: str, *, image: str | None = None, video: str | None = None,
                 processor=None, budget: dict | None = None) -> tuple[PromptInput, object]:
    """One user turn (the image / video first, then ``text``) rendered with the checkpoint's chat
    template and the generation prompt, as the data pipeline builds rollout prompts. ``budget``: the
    media's frame / pixel keywords of ``data.single.preprocess_single`` (default: the checkpoint's
    preprocessor configs)."""
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.single import preprocess_single

    model_dir = str(model_dir)
    processor = processor or QwenVLProcessor.from_pretrained(model_dir)
    if image is not None or video is not None:
        inputs = preprocess_single(model_dir, image=image, video=video, prompt=text, processor=processor,
                                   **(budget or {}))
        return PromptInput.from_inputs(inputs), processor
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return PromptInput(processor.encode_prompt(messages, [])), processor
