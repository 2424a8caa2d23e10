"""Vision features computed once per prompt per step and reused by every pass and every response.

The vision tower is frozen, so the features of a prompt's images/videos are the same for the old pass,
the reference pass, every update and all G responses: the first pipeline stage encodes the step's
prompts once (one tower call for the images, one for the videos) and splits the result per prompt.
Under context parallelism the ranks of a CP group hold the same prompts: each encodes a share of the
frames and the features are all-gathered (``Qwen25VLModel.encode_vision(split_over_cp=True)``).
"""

from __future__ import annotations

import torch

from megatron_ral.inference.prompts import PromptInput, concat_vision
from megatron_ral.models.qwen25vl.vision import VisionEmbeddings


def _split(features: torch.Tensor | None, counts: list[int]) -> list[torch.Tensor | None]:
    if features is None:
        return [None] * len(counts)
    parts = torch.split(features, counts, dim=0)
    return [p if n else None for p, n in zip(parts, counts)]


@torch.no_grad()
def encode_prompts_vision(model, prompts: list[PromptInput]) -> list[VisionEmbeddings | None]:
    """Per-prompt VisionEmbeddings on the first pipeline stage ([] on other stages)."""
    if not getattr(model, "pre_process", False):
        return []
    vision = concat_vision(prompts)
    if vision["pixel_values"] is None and vision["pixel_values_videos"] is None:
        return [None] * len(prompts)
    feats = model.encode_vision(**vision, split_over_cp=True)
    img_counts = [int((p.input_ids == model.image_token_id).sum()) for p in prompts]
    vid_counts = [int((p.input_ids == model.video_token_id).sum()) for p in prompts]
    images, videos = _split(feats.image, img_counts), _split(feats.video, vid_counts)
    return [VisionEmbeddings(image=i, video=v) if (i is not None or v is not None) else None
            for i, v in zip(images, videos)]
