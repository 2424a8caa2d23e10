"""Qwen2.5-VL vision tower + patch merger, and the merge of its features into token embeddings.

The tower is transformers' own ``Qwen2_5_VisionTransformerPretrainedModel`` built from the HF
``vision_config`` (so its parameter names are HF's ``visual.*`` names). It is frozen, replicated
over tensor-parallel ranks and lives on the first pipeline stage only.

Features are computed once per prompt (:func:`encode_vision`; under context parallelism each CP rank encodes
a share of the frames and the features are all-gathered) and can be reused for the G responses
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


def split_vision_work(grid_thw: torch.Tensor, parts: int) -> list[list[tuple[int, int, int]]]:
    """The tower's work cut into ``parts`` contiguous shares of near-equal patch count.

    The unit of work is one temporal step of one image/video (``h * w`` patches): the tower attends within a
    temporal step only (its window attention and its full-attention blocks are per frame pair), so encoding
    steps ``[t0, t1)`` of an item as an item of their own gives exactly those steps' features. Share c is a list
    of pieces ``(item, t0, t1)`` in processor order; the shares are consecutive (share c + 1 starts where share
    c ends), so each holds one contiguous range of pixel rows and of feature rows. A share may be empty."""
    units = [(i, t, int(h) * int(w)) for i, (tt, h, w) in enumerate(grid_thw.tolist()) for t in range(int(tt))]
    total = sum(c for _, _, c in units)
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    done = 0
    for item, t, cost in units:
        # the share whose cost interval [c * total / parts, (c + 1) * total / parts) holds this unit's midpoint
        share = min(parts - 1, int((2 * done + cost) * parts // (2 * total))) if total else 0
        pieces = shares[share]
        if pieces and pieces[-1][0] == item and pieces[-1][2] == t:
            pieces[-1] = (item, pieces[-1][1], t + 1)
        else:
            pieces.append((item, t, t + 1))
        done += cost
    return shares


def _encode_share(tower, pixels: torch.Tensor, grid_thw: torch.Tensor, pieces: list[tuple[int, int, int]],
                  merge: int, out_dim: int) -> torch.Tensor:
    """Features of the pieces ``(item, t0, t1)`` (one contiguous range of pixel rows) of a batch."""
    param = next(tower.parameters())
    if not pieces:
        return torch.zeros(0, out_dim, dtype=param.dtype, device=param.device)
    patches = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
    starts = [0]
    for n in patches:
        starts.append(starts[-1] + n)
    grids, first, last = [], None, None
    for item, t0, t1 in pieces:
        _, h, w = (int(v) for v in grid_thw[item].tolist())
        lo, hi = starts[item] + t0 * h * w, starts[item] + t1 * h * w
        first = lo if first is None else first
        last = hi
        grids.append([t1 - t0, h, w])
    sub = torch.tensor(grids, dtype=grid_thw.dtype)
    return _run_tower(tower, pixels[first:last], sub)


def _run_tower_split(tower, pixels: torch.Tensor, grid_thw: torch.Tensor, group) -> torch.Tensor:
    """The tower's features of a batch, each rank of ``group`` encoding one share (:func:`split_vision_work`),
    all-gathered in processor order on every rank."""
    import torch.distributed as dist

    from megatron_ral.models.qwen25vl.context_parallel import all_gather_rows

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    merge = int(getattr(tower, "spatial_merge_size", tower.config.spatial_merge_size))
    out_dim = int(tower.config.out_hidden_size)
    grid_thw = grid_thw.cpu()
    shares = split_vision_work(grid_thw, size)
    rows = [sum((t1 - t0) * int(grid_thw[i, 1]) * int(grid_thw[i, 2]) // merge**2 for i, t0, t1 in share)
            for share in shares]
    local = _encode_share(tower, pixels, grid_thw, shares[rank], merge, out_dim)
    return all_gather_rows(local, rows, group)


@torch.no_grad()
def encode_vision(
    tower,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    group=None,
) -> VisionEmbeddings:
    """Run the frozen tower on the images and on the videos of a batch (one call each).

    ``group`` (a process group whose ranks all hold this same batch, e.g. the context-parallel group): each
    rank encodes a share of the temporal steps (:func:`split_vision_work`) and the features are all-gathered,
    equal to the unsplit ones; None or a group of one: the whole batch here."""
    import torch.distributed as dist

    split = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1

    def run(pixels, grid):
        return _run_tower_split(tower, pixels, grid, group) if split else _run_tower(tower, pixels, grid)

    out = VisionEmbeddings()
    if pixel_values is not None:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        out.image = run(pixel_values, image_grid_thw)
    if pixel_values_videos is not None:
        if video_grid_thw is None:
            raise ValueError("pixel_values_videos given without video_grid_thw")
        out.video = run(pixel_values_videos, video_grid_thw)
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


def select_vision_features(
    embeds: VisionEmbeddings, input_ids: torch.Tensor, token_index: torch.Tensor, image_token_id: int,
    video_token_id: int,
) -> VisionEmbeddings:
    """The feature rows of the placeholder tokens at positions ``token_index`` (a context-parallel rank's
    share of the sequence), in the order :func:`merge_vision_embeddings` fills ``input_ids[:, token_index]``.

    ``embeds`` holds the features of every placeholder of ``input_ids`` (B, S), row-major."""

    def pick(features, token_id, name):
        mask = input_ids == token_id
        n_tokens = int(mask.sum())
        n_feat = 0 if features is None else features.shape[0]
        if n_tokens != n_feat:
            raise ValueError(f"{name}: {n_tokens} placeholder tokens in input_ids but {n_feat} feature rows")
        if features is None:
            return None
        order = (mask.reshape(-1).long().cumsum(0) - 1).reshape(mask.shape)  # feature row of each placeholder
        idx = token_index.to(mask.device)
        rows = order[:, idx][mask[:, idx]]
        return features.index_select(0, rows.to(features.device))

    return VisionEmbeddings(image=pick(embeds.image, image_token_id, "image"),
                            video=pick(embeds.video, video_token_id, "video"))

