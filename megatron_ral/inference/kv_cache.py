"""The KV cache: megatron-core's StaticInferenceContext plus row/column surgery and a token budget.

megatron's attention layers keep, per layer, key and value buffers of shape
(max_sequence_length, max_batch_size, kv_heads_per_tp_rank, head_dim) in
``context.key_value_memory_dict`` and append at ``context.sequence_len_offset``. On top of that this
module can reorder / repeat batch rows (G responses sharing one prompt prefill, dropping finished
rows) and drop leading columns that are padding for every remaining row.

Budget: a batch of R rows with sequences up to T tokens holds R * T cache tokens. ``plan_chunks``
splits a generation request into chunks whose R * T stays within ``kv_cache_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.inference.contexts import StaticInferenceContext


class KVCache:
    """A StaticInferenceContext for one batch, with helpers to reshape its buffers."""

    def __init__(self, batch_size: int, max_sequence_length: int):
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=max_sequence_length)

    @property
    def length(self) -> int:
        """Columns written so far (the position the next token is stored at)."""
        return self.context.sequence_len_offset

    @property
    def capacity(self) -> int:
        return self.context.max_sequence_length

    @property
    def batch_size(self) -> int:
        return self.context.max_batch_size

    def advance(self, n: int) -> None:
        """Record that n columns were written (the prompt after prefill, then one per decode step)."""
        self.context.increment_sequence_len_offset(n)
        self.context.enable_decode_mode()

    def _map(self, fn) -> None:
        mem = self.context.key_value_memory_dict
        for layer, (k, v) in list(mem.items()):
            mem[layer] = (fn(k), fn(v))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / repeat / reorder batch rows: new row i = old row index[i]."""
        index = index.to(dtype=torch.long)
        self._map(lambda t: t.index_select(1, index.to(t.device)))
        self.context.max_batch_size = int(index.numel())

    def drop_leading(self, n: int) -> None:
        """Forget the first n columns (padding for every row); positions live in the rotary ids, so
        shifting the columns changes nothing for attention."""
        if n <= 0:
            return
        if n > self.length:
            raise ValueError(f"cannot drop {n} columns of a cache holding {self.length}")
        self._map(lambda t: t[n:].clone())
        self.context.max_sequence_length -= n
        self.context.sequence_len_offset -= n

    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in self.context.key_value_memory_dict.values())


@dataclass(frozen=True)
class Chunk:
    """One generation batch: prompt indices and, per prompt, the sample indices it produces."""

    prompts: tuple[int, ...]
    samples: tuple[tuple[int, ...], ...]

    @property
    def rows(self) -> int:
        return sum(len(s) for s in self.samples)


def plan_chunks(
    prompt_lengths: list[int],
    num_samples: int,
    max_new_tokens: int,
    kv_cache_tokens: int,
    *,
    allow_padding: bool = True,
    max_rows: int | None = None,
) -> list[Chunk]:
    """Group prompts (longest first) into chunks with rows * (longest prompt + max_new_tokens - 1)
    <= kv_cache_tokens. A prompt whose ``num_samples`` rows alone exceed the budget is split over
    several chunks by sample index (each re-runs the prompt's prefill); a single row that does not
    fit is an error. ``allow_padding=False`` puts only equal-length prompts in one chunk.
    """
    if kv_cache_tokens <= 0:
        raise ValueError(f"kv_cache_tokens must be positive, got {kv_cache_tokens}")
    extra = max(max_new_tokens - 1, 0)
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    chunks: list[Chunk] = []
    cur_prompts: list[int] = []
    cur_samples: list[tuple[int, ...]] = []
    cur_len = 0

    def flush():
        nonlocal cur_prompts, cur_samples, cur_len
        if cur_prompts:
            chunks.append(Chunk(tuple(cur_prompts), tuple(cur_samples)))
        cur_prompts, cur_samples, cur_len = [], [], 0

    for i in order:
        length = prompt_lengths[i]
        per_row = length + extra
        if per_row > kv_cache_tokens:
            raise ValueError(
                f"prompt {i} needs {per_row} KV-cache tokens per response ({length} prompt + {extra} generated) "
                f"but the budget (generation.kv_cache_tokens) is {kv_cache_tokens}; raise it or lower max_new_tokens")
        rows_max = kv_cache_tokens // per_row
        if max_rows is not None:
            rows_max = min(rows_max, max_rows)
        rows_now = sum(len(s) for s in cur_samples)
        fits = (rows_now + num_samples) * (max(cur_len, length) + extra) <= kv_cache_tokens
        if max_rows is not None:
            fits = fits and rows_now + num_samples <= max_rows
        if cur_prompts and (not fits or (not allow_padding and length != cur_len)):
            flush()
        if num_samples <= rows_max:
            cur_prompts.append(i)
            cur_samples.append(tuple(range(num_samples)))
            cur_len = max(cur_len, length)
            continue
        flush()
        for start in range(0, num_samples, rows_max):
            chunks.append(Chunk((i,), (tuple(range(start, min(start + rows_max, num_samples))),)))
    flush()
    return chunks
