"""Qwen2.5-VL vision tower + patch merger, and the merge of its features into token embeddings.

The tower is transformers' own ``Qwen2_5_VisionTransformerPretrainedModel`` built from the HF
``vision_config`` (so its parameter names are HF's ``visual.*`` names). It is frozen, replicated
over tensor-parallel ranks and lives on the first pipeline stage only.

Features are computed once per prompt (:func:`encode_vision`) and can be reused for the G responses
of that prompt (:func:`repeat_vision_embeddings`), then scattered into the token embeddings in
place of the ``<|image_pad|>`` / ``<|video_pad|>`` tokens (:func:`merge_vision_embeddings`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


# The tower's initial (pre-checkpoint) weights come from this fixed seed, so that every rank holding
# a replica builds the same tensors whatever its RNG state.
VISION_INIT_SEED = 20250219


def build_vision_tower(vision_config, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None):
    """The transformers Qwen2.5-VL vision tower + merger, frozen and in eval mode."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    kwargs = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_INIT_SEED)
        # _from_config writes dtype / attention choice into the config it gets: give it a copy
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(copy.deepcopy(vision_config), **kwargs)
    freeze_(tower)
    return tower


def freeze_(module: torch.nn.Module) -> torch.nn.Module:
    """Disable gradients and put the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


@dataclass
class VisionEmbeddings:
    """Merged vision features in processor order: (num_image_tokens, H) and (num_video_tokens, H).

    Rows follow the order of the placeholder tokens in the batch (row by row), the order
    ``image_grid_thw`` / ``video_grid_thw`` list the images and videos.
    """

    image: torch.Tensor | None = None
    video: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> "VisionEmbeddings":
        return VisionEmbeddings(
            image=None if self.image is None else self.image.to(*args, **kwargs),
            video=None if self.video is None else self.video.to(*args, **kwargs),
        )


def _run_tower(tower, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    param = next(tower.parameters())
    out = tower(pixels.to(device=param.device, dtype=param.dtype), grid_thw=grid_thw.to(param.device))
    # transformers >= 5 returns a model output whose pooler_output holds the merged features;
    # 4.x returns the merged features directly.
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def encode_vision(
    tower,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> VisionEmbeddings:
    """Run the frozen tower on the images and on the videos of a batch (one call each)."""
    out = VisionEmbeddings()
    if pixel_values is not None:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        out.image = _run_tower(tower, pixel_values, image_grid_thw)
    if pixel_values_videos is not None:
        if video_grid_thw is None:
            raise ValueError("pixel_values_videos given without video_grid_thw")
        out.video = _run_tower(tower, pixel_values_videos, video_grid_thw)
    return out


def tokens_per_item(grid_thw: torch.Tensor, spatial_merge_size: int = 2) -> list[int]:
    """LM tokens of each image/video: t * h * w / merge^2."""
    return (grid_thw.prod(-1) // (spatial_merge_size**2)).tolist()


def repeat_vision_embeddings(
    embeds: VisionEmbeddings,
    input_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    repeats: int,
) -> VisionEmbeddings:
    """Features of a batch of prompts, each repeated ``repeats`` times consecutively.

    Matches a batch built as ``input_ids.repeat_interleave(repeats, dim=0)`` (prompt 0 G times,
    then prompt 1 G times, ...): the vision features are computed once per prompt and reused.
    ``input_ids`` is the un-repeated prompt batch (B, S).
    """

    def expand(features, token_id):
        if features is None:
            return None
        counts = (input_ids == token_id).sum(dim=1).tolist()
        if sum(counts) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} vision features for {sum(counts)} placeholder tokens")
        chunks = torch.split(features, counts, dim=0)
        return torch.cat([c for c in chunks for _ in range(repeats)], dim=0)

    return VisionEmbeddings(image=expand(embeds.image, image_token_id), video=expand(embeds.video, video_token_id))


def merge_vision_embeddings(
    token_embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    embeds: VisionEmbeddings,
    image_token_id: int,
    video_token_id: int,
) -> torch.Tensor:
    """Replace placeholder-token embeddings by vision features, in batch-major token order.

    ``token_embeddings`` is megatron's (S, B, H); ``input_ids`` (B, S). Returns (S, B, H).
    """
    out = token_embeddings.transpose(0, 1)  # (B, S, H) view
    masks = (input_ids == image_token_id, input_ids == video_token_id)
    counts = torch.stack([m.sum() for m in masks]).tolist()  # one read (a device synchronisation on a GPU)
    for features, mask, n_tokens, name in (
        (embeds.image, masks[0], counts[0], "image"),
        (embeds.video, masks[1], counts[1], "video"),
    ):
        n_feat = 0 if features is None else features.shape[0]
        if n_tokens != n_feat:
            raise ValueError(
                f"{name}: {n_tokens} placeholder tokens in input_ids but {n_feat} feature rows"
            )
        if n_tokens == 0:
            continue
        out = out.masked_scatter(mask.unsqueeze(-1).to(out.device), features.to(out.dtype))
    return out.transpose(0, 1).contiguous()
