"""Packed micro-batches: the step's sequences as streams of at most a token budget (``training.packing``).

The mini-batches are those of the padded layout (:func:`rl.batch.minibatch_members`: the same sequences,
so the same optimizer steps); only their cut into micro-batches and the model input change:

``sequences``  whole sequences (prompt + response), packed back to back; each sees only itself.
``groups``     a prompt and the responses of it in the mini-batch, ``[prompt, r_1, ..., r_G]``: every
               response sees its prompt and, causally, itself; the prompt runs once per group, so its
               gradient is the sum over its responses, as in the padded path. A group longer than the
               budget is split into sub-streams of responses that each carry the prompt.

Packing: the items (sequences, groups or sub-streams) are first-fit by length under the budget, balanced:
the number of streams first-fit decreasing needs, then each item (longest first) into the least filled
stream it fits in (:func:`balanced_bins`). Only the stream's tail is padded (to ``pad_to_multiple``: 2 x CP
under context parallelism). An item longer than the budget runs alone.

Positions: each sequence keeps the M-RoPE positions it has alone, the ones generation used: its prompt's
rope index (video timing included) and, for the response, the text positions continuing from the prompt
(a group's responses all continue from the prompt's last position). They are computed per prompt, never
across the stream. Vision features are scattered at each sequence's own placeholders (a group's prompt's
once), taken from the per-prompt features of the step.

Every per-sequence tensor of a packed :class:`MicroBatch` keeps the padded layout's meaning ([B] per
sequence, [B, R] per response token, the capture's rows [B, R, T] over each sequence's own keys), so the
losses, their global normalisers and the p_old store are unchanged: packed = padded in value and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ral.attention.capture import stream_response_layout
from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout
from megatron_ral.models.qwen25vl.rope_index import RopeIndexConfig, get_rope_index
from megatron_ral.rl.batch import (
    MicroBatch,
    PackedStream,
    RolloutBatch,
    SequenceRef,
    _cat,
    minibatch_members,
    plan_micro_batches,
)

PACKINGS = ("none", "sequences", "groups")


@dataclass(frozen=True)
class PackingSettings:
    """How a step's micro-batches are packed.

    kind: "sequences" or "groups"; max_tokens: token budget of a stream; rope: the model's M-RoPE index
    settings (positions of each sequence alone); pad_to_multiple: stream length multiple (2 x CP)."""

    kind: str
    max_tokens: int
    rope: RopeIndexConfig
    pad_to_multiple: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("sequences", "groups"):
            raise ValueError(f"packing kind must be 'sequences' or 'groups', got {self.kind!r}")
        if self.max_tokens < 1 or self.pad_to_multiple < 1:
            raise ValueError(f"max_tokens and pad_to_multiple must be >= 1, got {self.max_tokens}, "
                             f"{self.pad_to_multiple}")


def resolve_packing(packing: str, algorithm: str, backend: str, context_parallel_size: int = 1) -> str:
    """``training.packing`` for this run: "auto" = "groups" for RL, "sequences" for SFT, "none" under the
    Transformer Engine layer spec (its THD path serves an explicit "sequences": opt in, it never ran in CI) and
    under context parallelism. Errors: "groups" under TE (no mask for responses that share a prompt), a packed
    value under TE with context parallelism (TE splits packed input per sequence)."""
    if packing == "auto":
        if backend == "te" or context_parallel_size > 1:
            return "none"
        return "sequences" if algorithm == "sft" else "groups"
    if packing not in PACKINGS:
        raise ValueError(f"training.packing must be one of auto, {', '.join(PACKINGS)}; got {packing!r}")
    if packing == "groups" and backend == "te":
        raise ValueError("training.packing: 'groups' needs the local layer spec; this model was built with Transformer "
                         "Engine's (model.layer_spec: auto found it), which has no mask for responses that share a "
                         "prompt: set training.packing: sequences or none, or model.layer_spec: local")
    if packing != "none" and backend == "te" and context_parallel_size > 1:
        raise ValueError(f"training.packing: {packing!r} under the Transformer Engine layer spec with context "
                         "parallelism is not supported (TE splits packed input per sequence, the trainer the whole "
                         "stream): set training.packing: none or model.layer_spec: local")
    return packing


def balanced_bins(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of ``sizes`` in bins of total size <= ``budget`` (an item above the budget alone in its bin).

    As many bins as first-fit decreasing needs, then the items, longest first, each into the least filled bin
    that has room (a new bin if none has), so the bins come out balanced. Bins are ordered by their first
    item, and items within a bin by index (the batch's order)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    ffd: list[int] = []
    for i in order:
        for b, load in enumerate(ffd):
            if load + sizes[i] <= budget:
                ffd[b] += sizes[i]
                break
        else:
            ffd.append(sizes[i])
    loads = [0] * len(ffd)
    bins: list[list[int]] = [[] for _ in ffd]
    for i in order:
        fits = [b for b in range(len(bins)) if loads[b] + sizes[i] <= budget or not bins[b] and sizes[i] > budget]
        if fits:
            b = min(fits, key=lambda c: (loads[c], c))
        else:
            bins.append([])
            loads.append(0)
            b = len(bins) - 1
        bins[b].append(i)
        loads[b] += sizes[i]
    bins = [sorted(b) for b in bins if b]
    return sorted(bins, key=lambda b: b[0])


# ---------------------------------------------------------------------------------------------- positions
def prompt_positions(prompt, rope: RopeIndexConfig) -> tuple[Tensor, int]:
    """((3, P) M-RoPE positions of a prompt alone, the position of the text token that would follow it)."""
    ids = prompt.input_ids.long()
    text = next(t for t in range(3) if t not in (rope.image_token_id, rope.video_token_id))
    pos, _ = get_rope_index(torch.cat([ids, ids.new_tensor([text])])[None], rope, image_grid_thw=prompt.image_grid_thw,
                            video_grid_thw=prompt.video_grid_thw, second_per_grid_ts=prompt.second_per_grid_ts)
    return pos[:, 0, :-1], int(pos[0, 0, -1])


class _Positions:
    """Per-prompt positions of a step (computed once per prompt) and each sequence's positions."""

    def __init__(self, prompts: list, rope: RopeIndexConfig):
        self.prompts, self.rope, self.cache = prompts, rope, {}

    def prompt(self, p: int) -> tuple[Tensor, int]:
        if p not in self.cache:
            self.cache[p] = prompt_positions(self.prompts[p], self.rope)
        return self.cache[p]

    def sequence(self, p: int, response_length: int) -> Tensor:
        """(3, P + R): the prompt's positions, then text positions continuing from it."""
        pos, nxt = self.prompt(p)
        resp = (nxt + torch.arange(response_length)).expand(3, -1)
        return torch.cat([pos, resp.to(pos.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------- items
@dataclass
class _Item:
    """A unit of packing: one sequence ("sequences") or a prompt with some of its responses ("groups")."""

    prompt: int
    members: list[int]          # indices into the mini-batch's sequences, in order
    tokens: int


def _items(kind: str, refs: list[SequenceRef], plen: list[int], rlen: list[int], budget: int) -> list[_Item]:
    if kind == "sequences":
        return [_Item(ref.prompt, [i], plen[i] + rlen[i]) for i, ref in enumerate(refs)]
    items, i = [], 0
    while i < len(refs):  # the mini-batch is prompt-major: a prompt's responses are contiguous
        j = i
        while j < len(refs) and refs[j].prompt == refs[i].prompt:
            j += 1
        members, p = list(range(i, j)), plen[i]
        if p + sum(rlen[m] for m in members) <= budget:
            parts = [members]
        else:
            parts = [[members[k] for k in b] for b in balanced_bins([rlen[m] for m in members], max(budget - p, 1))]
        items += [_Item(refs[i].prompt, part, p + sum(rlen[m] for m in part)) for part in parts]
        i = j
    return items


def _group_stream(kind: str, items: list[_Item], plen: list[int], rlen: list[int]):
    """(layout spans description, per-sequence stream index, the prompts whose vision the stream holds)."""
    index: dict[int, Tensor] = {}
    vision, start = [], 0
    groups, seq_members = [], []
    for item in items:
        if kind == "sequences":
            (m,) = item.members
            n = plen[m] + rlen[m]
            index[m] = torch.arange(start, start + n)
            groups.append(n)
            seq_members.append(m)
            vision.append(item.prompt)
            start += n
            continue
        p = plen[item.members[0]]
        spans = [m for m in item.members if rlen[m] > 0]
        prompt_ix = torch.arange(start, start + p)
        for m in item.members:  # an empty response has no span; its (invalid) rows point at the prompt
            index[m] = prompt_ix
        if not spans:
            continue
        start += p
        vision.append(item.prompt)
        for m in spans:
            index[m] = torch.cat([prompt_ix, torch.arange(start, start + rlen[m])])
            start += rlen[m]
        groups.append((p, [rlen[m] for m in spans]))
        seq_members += spans
    return groups, seq_members, index, vision


def build_packed_micro_batch(index: int, minibatch: int, kind: str, items: list[_Item], refs: list[SequenceRef],
                             weights: list[float], batch: RolloutBatch, positions: _Positions, pad_token_id: int,
                             pad_to_multiple: int = 1) -> MicroBatch:
    """One packed micro-batch of ``items`` (sequences of the mini-batch ``refs``, in item order)."""
    order = [m for item in items for m in item.members]
    seqs_refs = [refs[m] for m in order]
    prompts, responses = batch.prompts, batch.responses
    plen_all = [len(prompts[r.prompt]) for r in refs]
    rlen_all = [int(responses[r.prompt][r.sample].numel()) for r in refs]
    groups, seq_members, where, vision = _group_stream(kind, items, plen_all, rlen_all)
    if not seq_members:
        raise ValueError("a packed micro-batch needs at least one sequence with tokens")
    tokens = {m: torch.cat([prompts[refs[m].prompt].input_ids.long(),
                            responses[refs[m].prompt][refs[m].sample].long()]) for m in order}
    pos = [positions.sequence(refs[m].prompt, rlen_all[m]) for m in seq_members]
    if kind == "sequences":
        layout = AttentionLayout.packed_sequences(groups, position_ids=pos, pad_to_multiple=pad_to_multiple)
    else:
        layout = AttentionLayout.shared_prompt_groups(groups, position_ids=pos, pad_to_multiple=pad_to_multiple)
    stream_ids = layout.scatter([tokens[m] for m in seq_members], pad_value=pad_token_id)

    plens = [plen_all[m] for m in order]
    rlens = [rlen_all[m] for m in order]
    b, s, r = len(order), max(plens[i] + rlens[i] for i in range(len(order))), max(max(rlens), 1)
    ids = torch.full((b, s), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, s), pad_token_id, dtype=torch.long)
    for i, m in enumerate(order):
        x = tokens[m]
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x) - 1] = x, 1, x[1:]
    resp_mask = torch.arange(r)[None, :] < torch.tensor(rlens)[:, None]
    gather = (torch.tensor(plens)[:, None] - 1 + torch.arange(r)[None, :]).clamp(0, s - 1)
    # the stream position predicting each response token (row-major over the valid rows) and the token
    loss_index = torch.cat([where[m][plen_all[m] - 1: plen_all[m] + rlen_all[m] - 1] for m in order])
    loss_labels = torch.cat([tokens[m][plen_all[m]:] for m in order])
    packed = PackedStream(layout=layout, input_ids=stream_ids, loss_index=loss_index[None], labels=loss_labels[None])
    rows = stream_response_layout([where[m] for m in order], plens, rlens)
    used = [prompts[p] for p in vision]
    return MicroBatch(
        index=index, minibatch=minibatch, refs=seqs_refs, input_ids=ids, attention_mask=mask, labels=labels,
        prompt_lengths=plens, response_lengths=rlens, response_mask=resp_mask, gather_index=gather,
        advantages=torch.stack([batch.advantages[x.prompt, x.sample] for x in seqs_refs]).to(torch.float32),
        weight=torch.tensor([weights[m] for m in order], dtype=torch.float32), layout=rows,
        image_grid_thw=_cat([p.image_grid_thw for p in used]), video_grid_thw=_cat([p.video_grid_thw for p in used]),
        second_per_grid_ts=_cat([p.second_per_grid_ts for p in used]), vision_rows=vision, packed=packed,
    )


def plan_packed_micro_batches(batch: RolloutBatch, num_minibatches: int, settings: PackingSettings,
                              pad_token_id: int, drop_zero_std_groups: bool = False) -> list[MicroBatch]:
    """The mini-batches of :func:`rl.batch.minibatch_members`, each cut into packed streams of at most
    ``settings.max_tokens`` tokens (see the module docstring)."""
    positions = _Positions(batch.prompts, settings.rope)
    out: list[MicroBatch] = []
    for m, (refs, weights) in enumerate(minibatch_members(batch, num_minibatches, drop_zero_std_groups)):
        plen = [len(batch.prompts[r.prompt]) for r in refs]
        rlen = [int(batch.responses[r.prompt][r.sample].numel()) for r in refs]
        items = _items(settings.kind, refs, plen, rlen, settings.max_tokens)
        for bin_ in balanced_bins([it.tokens for it in items], settings.max_tokens):
            out.append(build_packed_micro_batch(len(out), m, settings.kind, [items[i] for i in bin_], refs, weights,
                                                batch, positions, pad_token_id, settings.pad_to_multiple))
    return out


def plan_step_micro_batches(batch: RolloutBatch, num_minibatches: int, micro_batch_size: int, pad_token_id: int,
                            drop_zero_std_groups: bool = False,
                            packing: PackingSettings | None = None) -> list[MicroBatch]:
    """The step's micro-batches: right-padded ones of ``micro_batch_size`` sequences (``packing`` None), else
    packed streams."""
    if packing is None:
        return plan_micro_batches(batch, num_minibatches, micro_batch_size, pad_token_id, drop_zero_std_groups)
    return plan_packed_micro_batches(batch, num_minibatches, packing, pad_token_id, drop_zero_std_groups)
