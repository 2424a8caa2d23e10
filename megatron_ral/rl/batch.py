"""The rollout batch of one RL step and the micro-batches every pass over it uses.

A :class:`RolloutBatch` holds what this data-parallel rank generated and scored in one step: P prompts
(with their records and vision inputs), G responses each, rewards, advantages, and, after the old and
reference passes, the old / reference log-probs and the p_old store. Every rank of a model-parallel
group holds the same batch (the same prompts, the same generated tokens); the log-probs and p_old live
on the last pipeline stage only.

:func:`plan_micro_batches` fixes once per step how the P x G sequences (prompt-major: prompt 0's G
responses first) are split into mini-batches (optimizer steps) and micro-batches (pipeline
micro-batches of ``micro_batch_size`` sequences); the old pass, the reference pass and the updates all
iterate over the same :class:`MicroBatch` objects, so per-micro-batch results are keyed by
``MicroBatch.index``. ``rl.packing`` plans the same mini-batches as packed streams instead (a micro-batch
then carries a :class:`PackedStream`); every per-sequence tensor of a micro-batch ([B], [B, R], the
capture's rows [B, R, T]) keeps the padded layout's meaning either way, so the losses, their normalisers,
the p_old store and the metrics do not depend on the packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from megatron_ral.attention.capture import response_layout
from megatron_ral.attention.layout import RowLayout
from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout
from megatron_ral.models.qwen25vl.vision import VisionEmbeddings


@dataclass
class SequenceRef:
    """One training sequence: response ``sample`` of local prompt ``prompt``."""

    prompt: int
    sample: int


@dataclass
class PackedStream:
    """The model input of a packed micro-batch: one stream row (b = 1) and where its losses are.

    ``layout``: the stream's :class:`AttentionLayout` (spans, visibility, per-token M-RoPE positions);
    ``input_ids`` [1, L]; ``loss_index`` [1, N]: the stream position predicting each response token (N = the
    micro-batch's response tokens, sequence by sequence; a group's prompt's last position once per response);
    ``labels`` [1, N]: those tokens (``labels_at_index``)."""

    layout: AttentionLayout
    input_ids: Tensor
    loss_index: Tensor
    labels: Tensor

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class MicroBatch:
    """B sequences (prompt + response) and everything a pass needs about them.

    ``input_ids`` / ``attention_mask`` / ``labels`` are the sequences right-padded ([B, S]); the model runs
    on them unless ``packed`` holds a stream (then they serve the per-sequence diagnostics only).
    Rows of the per-token tensors ``[B, R]`` are the response tokens (row r = response token r);
    ``gather_index[b, r]`` is the padded position whose next-token loss is response token r's (P_b - 1 + r).
    ``advantages`` [B] and ``weight`` [B] (0 for a sequence kept only so that a rank has work) are per
    sequence. ``vision_rows`` lists the prompts whose vision features the model input holds, in order
    (one per padded row; once per packed sequence or group).
    """

    index: int
    minibatch: int
    refs: list[SequenceRef]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    prompt_lengths: list[int]
    response_lengths: list[int]
    response_mask: Tensor
    gather_index: Tensor
    advantages: Tensor
    weight: Tensor
    layout: RowLayout
    image_grid_thw: Tensor | None = None
    video_grid_thw: Tensor | None = None
    second_per_grid_ts: Tensor | None = None
    vision_rows: list[int] = field(default_factory=list)
    packed: PackedStream | None = None
    host_inputs: dict = field(default_factory=dict, repr=False)  # derived model inputs, see rl.schedule

    @property
    def size(self) -> int:
        return len(self.refs)

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def forward_shape(self) -> tuple[int, int]:
        """(batch, sequence) of the model forward: (B, S) padded, (1, L) packed."""
        if self.packed is not None:
            return 1, self.packed.length
        return self.size, self.seq_length

    @property
    def token_positions(self) -> int:
        """Token positions the model computes for this micro-batch (padding included)."""
        b, s = self.forward_shape
        return b * s

    def to_rows(self, values: Tensor) -> Tensor:
        """Values the model gives at the loss positions -> ``[B, R, ...]`` aligned like ``response_mask``:
        padded ``[B, R, ...]`` as they are; packed ``[1, N, ...]`` scattered to the valid rows, 0 on padding
        rows (differentiable)."""
        if self.packed is None:
            return values
        n = self.packed.loss_index.shape[1]
        if values.dim() < 2 or tuple(values.shape[:2]) != (1, n):
            raise ValueError(f"expected values at the {n} packed loss positions [1, {n}, ...], "
                             f"got {tuple(values.shape)}")
        b, r = torch.nonzero(self.response_mask, as_tuple=True)  # row-major: the order of the loss positions
        out = values.new_zeros(tuple(self.response_mask.shape) + tuple(values.shape[2:]))
        return out.index_put((b.to(values.device), r.to(values.device)), values[0])

    @property
    def num_tokens(self) -> int:
        """Response tokens of the sequences that count (weight 1)."""
        return int((self.response_mask & (self.weight[:, None] > 0)).sum())

    @property
    def num_sequences(self) -> int:
        return int((self.weight > 0).sum())

    def token_logprobs(self, token_loss: Tensor) -> Tensor:
        """Response-aligned log-probs [B, R] from the model's per-token loss at ``gather_index`` (the model
        computes the output layer there only: ``loss_index=gather_index``; packed: at ``packed.loss_index``,
        [1, N], scattered to the rows, 0 on padding rows)."""
        if self.packed is not None:
            if tuple(token_loss.shape) != tuple(self.packed.loss_index.shape):
                raise ValueError(f"expected the per-token loss at the packed loss positions "
                                 f"{tuple(self.packed.loss_index.shape)}, got {tuple(token_loss.shape)}")
            return self.to_rows(-token_loss)
        if tuple(token_loss.shape) != tuple(self.gather_index.shape):
            raise ValueError(f"expected the per-token loss at the response positions {tuple(self.gather_index.shape)}, "
                             f"got {tuple(token_loss.shape)}")
        return -token_loss

    def vision_mask(self, image_token_id: int, video_token_id: int) -> Tensor:
        ids = self.input_ids
        return (ids == image_token_id) | (ids == video_token_id)


@dataclass
class RolloutBatch:
    """One step's rollouts on this data-parallel rank (see the module docstring).

    rewards / accuracy / format / advantages: [P, G]; zero_std: [P]; responses[p][g] token ids (the stop
    token included when one ended the response) and texts[p][g] decoded; prompt_keys: the prompts'
    indices in the global batch of the step (as drawn: the layout-independent sampling seeds; as trained on:
    the positions among the kept groups, see ``rl.dynamic_sampling``); rollout_logprobs[p][g]:
    the generator's log-prob of each response token under softmax(logits / T).
    """

    prompts: list
    records: list
    prompt_keys: list[int]
    responses: list[list[Tensor]]
    texts: list[list[str]]
    finish_reasons: list[list[str]]
    rewards: Tensor
    accuracy: Tensor
    format: Tensor
    advantages: Tensor
    zero_std: Tensor
    generation_seconds: float = 0.0
    generated_tokens: int = 0
    rollout_logprobs: list[list[Tensor]] = field(default_factory=list)
    micro_batches: list[MicroBatch] = field(default_factory=list)
    vision: list[VisionEmbeddings | None] = field(default_factory=list)
    old_logprobs: dict[int, Tensor] = field(default_factory=dict)
    ref_logprobs: dict[int, Tensor] = field(default_factory=dict)
    old_policy: object = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def group_size(self) -> int:
        return int(self.rewards.shape[1]) if self.rewards.numel() else 0

    def response_lengths(self) -> Tensor:
        return torch.tensor([[int(r.numel()) for r in row] for row in self.responses], dtype=torch.float32)

    def minibatches(self) -> list[list[MicroBatch]]:
        out: dict[int, list[MicroBatch]] = {}
        for mb in self.micro_batches:
            out.setdefault(mb.minibatch, []).append(mb)
        return [out[k] for k in sorted(out)]


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def build_micro_batch(index: int, minibatch: int, refs: list[SequenceRef], prompts: list, responses: list[list[Tensor]],
                      advantages: Tensor, weights: list[float], pad_token_id: int) -> MicroBatch:
    """Right-padded inputs of the sequences ``refs`` (prompt + response tokens)."""
    seqs, plens, rlens = [], [], []
    for ref in refs:
        prompt = prompts[ref.prompt]
        resp = responses[ref.prompt][ref.sample].to(torch.long)
        seqs.append(torch.cat([prompt.input_ids.to(torch.long), resp]))
        plens.append(len(prompt))
        rlens.append(int(resp.numel()))
    b, s, r = len(seqs), max(len(x) for x in seqs), max(max(rlens), 1)
    ids = torch.full((b, s), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, s), pad_token_id, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
        labels[i, : len(x) - 1] = x[1:]
    resp_mask = torch.arange(r)[None, :] < torch.tensor(rlens)[:, None]
    gather = (torch.tensor(plens)[:, None] - 1 + torch.arange(r)[None, :]).clamp(0, s - 1)
    layout = response_layout(plens, rlens, padding_mask=mask.bool())
    used = [prompts[ref.prompt] for ref in refs]
    return MicroBatch(
        index=index, minibatch=minibatch, refs=list(refs), input_ids=ids, attention_mask=mask, labels=labels,
        prompt_lengths=plens, response_lengths=rlens, response_mask=resp_mask, gather_index=gather,
        advantages=torch.stack([advantages[ref.prompt, ref.sample] for ref in refs]).to(torch.float32),
        weight=torch.tensor(weights, dtype=torch.float32), layout=layout,
        image_grid_thw=_cat([p.image_grid_thw for p in used]),
        video_grid_thw=_cat([p.video_grid_thw for p in used]),
        second_per_grid_ts=_cat([p.second_per_grid_ts for p in used]),
        vision_rows=[ref.prompt for ref in refs],
    )


def minibatch_members(batch: RolloutBatch, num_minibatches: int,
                      drop_zero_std_groups: bool = False) -> list[tuple[list[SequenceRef], list[float]]]:
    """(sequences, weights) of each of ``num_minibatches`` contiguous mini-batches of near-equal size of the
    P x G sequences (prompt-major), whatever the micro-batch layout.

    With ``drop_zero_std_groups`` the responses of groups whose rewards are all equal are left out (they
    have A = 0). A mini-batch left with no sequence keeps one with weight 0, so that every rank runs
    each optimizer step's schedule and gradient reduction.
    """
    refs = [SequenceRef(p, g) for p in range(batch.num_prompts) for g in range(len(batch.responses[p]))]
    if not refs:
        raise ValueError("a rollout batch needs at least one sequence")
    kept = [r for r in refs if not (drop_zero_std_groups and bool(batch.zero_std[r.prompt]))]
    chunks = [list(c) for c in np.array_split(np.arange(len(kept)), num_minibatches)] if kept else []
    out = []
    for m in range(num_minibatches):
        members = [kept[i] for i in chunks[m]] if kept and m < len(chunks) else []
        weights = [1.0] * len(members)
        if not members:
            members, weights = [refs[0]], [0.0]
        out.append((members, weights))
    return out


def plan_micro_batches(batch: RolloutBatch, num_minibatches: int, micro_batch_size: int, pad_token_id: int,
                       drop_zero_std_groups: bool = False) -> list[MicroBatch]:
    """Split the P x G sequences into the mini-batches of :func:`minibatch_members`, each into right-padded
    micro-batches of at most ``micro_batch_size`` sequences (``training.packing: none``)."""
    out: list[MicroBatch] = []
    for m, (members, weights) in enumerate(minibatch_members(batch, num_minibatches, drop_zero_std_groups)):
        for start in range(0, len(members), micro_batch_size):
            part = members[start: start + micro_batch_size]
            out.append(build_micro_batch(len(out), m, part, batch.prompts, batch.responses, batch.advantages,
                                         weights[start: start + micro_batch_size], pad_token_id))
    return out


def micro_batch_vision(mb: MicroBatch, per_prompt: list[VisionEmbeddings | None]) -> VisionEmbeddings | None:
    """The vision features of a micro-batch's rows, in row order, from per-prompt features."""
    feats = [per_prompt[p] for p in mb.vision_rows]
    if all(f is None for f in feats):
        return None
    return VisionEmbeddings(image=_cat([f.image for f in feats if f is not None]),
                            video=_cat([f.video for f in feats if f is not None]))
