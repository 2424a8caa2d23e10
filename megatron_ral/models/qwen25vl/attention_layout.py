"""Training layouts as data: which keys each token of a stream may see, its M-RoPE positions, its CP split.

One :class:`AttentionLayout` describes the token stream of one forward, whatever the layout:

- ``none``: a plain batch of ``b >= 1`` rows, causal attention; row i holds sequence i (right padding).
- ``sequences``: several whole sequences packed in one row (``b = 1``): block-diagonal causal attention.
- ``groups``: prompts with their responses, ``[prompt, r_1, ..., r_G]`` (several groups may follow each
  other in one row, ``b = 1``): a prompt token sees the earlier prompt tokens; a response token sees its
  whole prompt and, causally, its own response; never another response.

The stream is cut into **spans** (contiguous runs of tokens: one per packed sequence, or one per prompt and
per response). A logical **sequence** is what the padded path runs as one row: one span (``sequences``,
``none``) or (prompt span, response span) (``groups``). The visibility rule, for a query at stream index t
inside span s:

    key j visible  <=>  span(s).start <= j <= t                      (causal within its own span)
                    or  prefix_start(t) <= j < prefix_end(t)        (the whole prompt of a response)

so every token sees at least itself. Per token this is three int64 tensors of length L (``causal_start``,
``prefix_start``, ``prefix_end``; an empty prefix has start == end), which the core attention compares with
*global* key indices, also when the stream is split over context-parallel ranks. Tokens after the last span
(tail padding to a multiple of ``2 * CP``) form one more causal run that no real token sees.

Positions are the per-token M-RoPE position ids ``(3, b, L)`` of the rollout: each packed sequence keeps the
positions it has alone, and a response in a group continues from its prompt's positions exactly as in its
padded row. They are never recomputed across the stream.

Context parallelism uses megatron's load-balanced split: the stream is cut into ``2C`` equal chunks and CP
rank i holds chunks i and ``2C - 1 - i`` (in that order); :meth:`AttentionLayout.cp_indices` gives the
global token indices of a rank. megatron-core's ``MultimodalRotaryEmbedding`` slices the rotary table the
same way, so the model is given the *global* position ids and the rank's share of the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

LayoutKind = Literal["none", "sequences", "groups"]
KINDS = ("none", "sequences", "groups")


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of a stream row."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def cp_indices(length: int, cp_size: int, cp_rank: int) -> Tensor:
    """int64 global indices of the tokens CP rank ``cp_rank`` holds under the load-balanced split of a
    sequence of ``length`` tokens: chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is not a rank of a context-parallel group of {cp_size}")
    if length % (2 * cp_size):
        raise ValueError(
            f"a stream of {length} tokens does not split over {cp_size} context-parallel ranks: its length must be "
            f"a multiple of 2 * CP = {2 * cp_size} (pad it, e.g. with pad_to_multiple={2 * cp_size})"
        )
    chunk = length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def text_position_ids(length: int) -> Tensor:
    """(3, length) M-RoPE ids of a text-only sequence: 0..length-1 on all three axes."""
    return torch.arange(length).expand(3, length).clone()


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """A token stream: spans, which keys each query sees, per-token M-RoPE positions.

    Attributes:
        kind: "none", "sequences" or "groups" (see the module docstring).
        length: tokens per row of the stream, tail padding included (L).
        batch_size: rows (b); 1 unless kind == "none".
        spans: for "sequences"/"groups", the spans of the row in stream order (each prompt before its
            responses); for "none", span i = the real tokens ``[0, n_i)`` of row i.
        sequences: each logical sequence (a row of the padded path) as indices into ``spans``: ``(i,)``, or
            ``(prompt, response)`` for "groups". For "none", sequence i is row i.
        position_ids: int64 (3, b, L) M-RoPE position ids (0 at tail padding).

    Build it with :meth:`plain`, :meth:`packed_sequences` or :meth:`shared_prompt_groups`.
    """

    kind: LayoutKind
    length: int
    batch_size: int
    spans: tuple[Span, ...]
    sequences: tuple[tuple[int, ...], ...]
    position_ids: Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "none" and self.batch_size != 1:
            raise ValueError(f"a packed layout ({self.kind!r}) is one row (b = 1), got b = {self.batch_size}")
        if tuple(self.position_ids.shape) != (3, self.batch_size, self.length):
            raise ValueError(f"position_ids must be (3, b, L) = {(3, self.batch_size, self.length)}, "
                             f"got {tuple(self.position_ids.shape)}")
        end = 0
        for span in self.spans:
            if self.kind == "none":
                if span.start != 0 or not 0 < span.end <= self.length:
                    raise ValueError(f"a row of a 'none' layout must be [0, n) with 0 < n <= {self.length}, "
                                     f"got {span}")
                continue
            if span.start != end or span.end <= span.start:
                raise ValueError(f"spans must tile the stream from 0 without gaps or empty spans; got {span} "
                                 f"after {end}")
            end = span.end
        if end > self.length:
            raise ValueError(f"the spans cover {end} tokens, more than the stream length {self.length}")
        for seq in self.sequences:
            allowed = (1, 2) if self.kind == "groups" else (1,)
            if len(seq) not in allowed:
                raise ValueError(f"a {self.kind!r} sequence is {' or '.join(map(str, allowed))} span(s), got {seq}")
            if len(seq) == 2 and seq[0] >= seq[1]:
                raise ValueError(f"a response span must follow its prompt span, got {seq}")
        if self.kind == "none" and len(self.sequences) != self.batch_size:
            raise ValueError(f"a 'none' layout has one sequence per row, got {len(self.sequences)} "
                             f"for b = {self.batch_size}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def plain(cls, batch_size: int, length: int, position_ids: Tensor | None = None,
              lengths: Sequence[int] | None = None) -> "AttentionLayout":
        """Causal attention over ``batch_size`` rows of ``length`` tokens (``lengths``: real tokens per row,
        default all). ``position_ids`` (3, b, L), default text positions."""
        lengths = [length] * batch_size if lengths is None else [int(n) for n in lengths]
        if len(lengths) != batch_size:
            raise ValueError(f"{len(lengths)} row lengths for {batch_size} rows")
        if position_ids is None:
            position_ids = text_position_ids(length)[:, None].expand(3, batch_size, length).clone()
        return cls("none", length, batch_size, tuple(Span(0, n) for n in lengths),
                   tuple((i,) for i in range(batch_size)), position_ids.long())

    @classmethod
    def packed_sequences(cls, lengths: Sequence[int], position_ids: Sequence[Tensor] | None = None,
                         pad_to_multiple: int = 1) -> "AttentionLayout":
        """Whole sequences of ``lengths`` tokens packed in one row, each seeing only itself (causal).

        ``position_ids``: one (3, n_i) tensor per sequence (its positions alone, e.g. from the rollout or
        ``get_rope_index``); default text positions. ``pad_to_multiple``: pad the tail so the stream length
        is a multiple (2 * CP for context parallelism)."""
        lengths = [int(n) for n in lengths]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"packed sequences need at least one token each, got lengths {lengths}")
        spans, start = [], 0
        for n in lengths:
            spans.append(Span(start, start + n))
            start += n
        layout = cls._packed("sequences", spans, tuple((i,) for i in range(len(spans))), start, pad_to_multiple)
        return layout._with_positions(position_ids)

    @classmethod
    def shared_prompt_groups(cls, groups: Sequence[tuple[int, Sequence[int]]],
                             position_ids: Sequence[Tensor] | None = None,
                             pad_to_multiple: int = 1) -> "AttentionLayout":
        """Groups ``(prompt_length, [response lengths])``, each laid out ``[prompt, r_1, ..., r_G]``.

        The logical sequences are (prompt, r_j) for every group and response, in that order.
        ``position_ids``: one (3, P + R_j) tensor per logical sequence (the padded row's positions); the
        prompt part must agree across a group's responses. Default: text positions (responses continue
        from their prompt's last position)."""
        spans, seqs, start = [], [], 0
        for prompt_len, responses in groups:
            responses = [int(r) for r in responses]
            if prompt_len < 1 or not responses or min(responses) < 1:
                raise ValueError(f"a group needs a prompt and at least one response of >= 1 token, got "
                                 f"({prompt_len}, {responses})")
            prompt = len(spans)
            spans.append(Span(start, start + prompt_len))
            start += prompt_len
            for r in responses:
                seqs.append((prompt, len(spans)))
                spans.append(Span(start, start + r))
                start += r
        layout = cls._packed("groups", spans, tuple(seqs), start, pad_to_multiple)
        return layout._with_positions(position_ids)

    @classmethod
    def _packed(cls, kind, spans, seqs, used: int, pad_to_multiple: int) -> "AttentionLayout":
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        length = -(-used // pad_to_multiple) * pad_to_multiple
        return cls(kind, length, 1, tuple(spans), seqs, torch.zeros(3, 1, length, dtype=torch.long))

    def _with_positions(self, position_ids: Sequence[Tensor] | None) -> "AttentionLayout":
        if position_ids is None:
            position_ids = [text_position_ids(n) for n in self.sequence_lengths]
        if len(position_ids) != len(self.sequences):
            raise ValueError(f"{len(position_ids)} position-id tensors for {len(self.sequences)} sequences")
        pos = [torch.as_tensor(p).long() for p in position_ids]
        for i, (p, n) in enumerate(zip(pos, self.sequence_lengths)):
            if tuple(p.shape) != (3, n):
                raise ValueError(f"position_ids of sequence {i} must be (3, {n}), got {tuple(p.shape)}")
        stream = self.scatter(pos, dim=1)  # (1, 3, L)
        if self.kind == "groups":
            back = self.gather(stream, dim=1)
            for i, (p, q) in enumerate(zip(pos, back)):
                if not torch.equal(p, q):
                    raise ValueError(
                        f"sequence {i}: the responses of a group must share their prompt's position ids (the prompt "
                        "part differs from the group's first response)"
                    )
        return AttentionLayout(self.kind, self.length, self.batch_size, self.spans, self.sequences,
                               stream.permute(1, 0, 2).contiguous())

    # ------------------------------------------------------------------ shape facts
    @property
    def sequence_lengths(self) -> list[int]:
        """Tokens of each logical sequence (its padded-path row length)."""
        return [sum(self.spans[i].length for i in seq) for seq in self.sequences]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) token positions of the stream, summed over rows."""
        if self.kind == "none":
            return sum(s.length for s in self.spans)
        return self.spans[-1].end if self.spans else 0

    # ------------------------------------------------------------------ visibility
    def visibility(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """int64 [L] tensors ``(causal_start, prefix_start, prefix_end)`` of every stream position (same for
        every row of a "none" layout): key j is visible to query t iff ``causal_start[t] <= j <= t`` or
        ``prefix_start[t] <= j < prefix_end[t]``."""
        key = ("visibility", str(device))
        if key not in self._cache:
            causal = torch.zeros(self.length, dtype=torch.long)
            p_start = torch.zeros(self.length, dtype=torch.long)
            p_end = torch.zeros(self.length, dtype=torch.long)
            if self.kind != "none":
                for span in self.spans:
                    causal[span.start:span.end] = span.start
                tail = self.spans[-1].end
                causal[tail:] = tail  # tail padding: a causal run of its own
                for prompt, response in (s for s in self.sequences if len(s) == 2):
                    r, p = self.spans[response], self.spans[prompt]
                    p_start[r.start:r.end] = p.start
                    p_end[r.start:r.end] = p.end
            self._cache[key] = tuple(t.to(device) for t in (causal, p_start, p_end))
        return self._cache[key]

    def dense_mask(self) -> Tensor:
        """bool [L, L], True = visible: the whole mask (for tests and small inputs only)."""
        causal, p_start, p_end = self.visibility()
        t = torch.arange(self.length)
        j = t[None, :]
        return ((j >= causal[:, None]) & (j <= t[:, None])) | ((j >= p_start[:, None]) & (j < p_end[:, None]))

    # ------------------------------------------------------------------ context parallelism
    def cp_indices(self, cp_size: int, cp_rank: int) -> Tensor:
        """Global token indices held by CP rank ``cp_rank`` (load-balanced split; see :func:`cp_indices`)."""
        return cp_indices(self.length, cp_size, cp_rank)

    def split_for_cp(self, x: Tensor, dim: int, cp_size: int, cp_rank: int) -> Tensor:
        """This CP rank's share of a stream tensor ``x`` whose dimension ``dim`` is the stream (length L)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"dimension {dim} of the tensor has {x.shape[dim]} entries, the stream {self.length}")
        return x.index_select(dim, self.cp_indices(cp_size, cp_rank).to(x.device))

    # ------------------------------------------------------------------ per-sequence <-> stream
    def scatter(self, values: Sequence[Tensor], dim: int = 0, pad_value=0) -> Tensor:
        """Stream tensor ``(b, *shape)`` from one tensor per logical sequence, sequence along ``dim``.

        "none": row i holds values[i], right-padded to L. Packed kinds: each span is taken from the first
        sequence that contains it (a group's prompt from its first response's row), tail padded with
        ``pad_value``."""
        if len(values) != len(self.sequences):
            raise ValueError(f"{len(values)} tensors for {len(self.sequences)} sequences")
        for i, (v, n) in enumerate(zip(values, self.sequence_lengths)):
            if v.shape[dim] != n:
                raise ValueError(f"sequence {i} has {n} tokens, its tensor {v.shape[dim]} along dimension {dim}")
        ref = values[0]
        shape = list(ref.shape)
        shape[dim] = self.length
        if self.kind == "none":
            out = ref.new_full([self.batch_size] + shape, pad_value)
            for i, v in enumerate(values):
                out[i].narrow(dim, 0, v.shape[dim]).copy_(v)
            return out
        out = ref.new_full(shape, pad_value)
        source: dict[int, tuple[int, int]] = {}
        for s, seq in enumerate(self.sequences):
            offset = 0
            for span in seq:
                source.setdefault(span, (s, offset))
                offset += self.spans[span].length
        for span_index, span in enumerate(self.spans):
            s, offset = source[span_index]
            out.narrow(dim, span.start, span.length).copy_(values[s].narrow(dim, offset, span.length))
        return out.unsqueeze(0)

    def gather(self, stream: Tensor, dim: int = 0) -> list[Tensor]:
        """One tensor per logical sequence from a stream tensor ``(b, *shape)`` whose ``shape`` has the
        stream along ``dim``: the values the padded path has at that sequence's real tokens."""
        if stream.shape[0] != self.batch_size or stream.shape[dim + 1] != self.length:
            raise ValueError(f"stream tensor of shape {tuple(stream.shape)} does not hold b={self.batch_size} rows "
                             f"of L={self.length} along dimension {dim + 1}")
        if self.kind == "none":
            return [stream[i].narrow(dim, 0, self.spans[i].length) for i in range(self.batch_size)]
        row = stream[0]
        return [torch.cat([row.narrow(dim, self.spans[i].start, self.spans[i].length) for i in seq], dim=dim)
                for seq in self.sequences]
