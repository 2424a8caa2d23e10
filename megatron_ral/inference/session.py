"""One batch of rows decoding with a KV cache on this rank's pipeline stage.

Layout: rows are left-padded to the longest prompt, so every row's next token is written at the
same cache column (megatron's static context has one sequence offset for the batch). Padding
columns are masked out of attention at every step (a (B, 1, 1, T) bool mask, True = masked); rows
without padding need no mask.

Positions (M-RoPE): the prompt's (3, L) ids come from the model's rope index; a generated token
gets ``cache_position + rope_delta`` in all three rows, where cache_position counts the row's real
tokens before it. The cache holds rotated keys and the project's decode attention serves every step,
whatever the layer spec (see ``attention``), so a step needs only the new token's positions. Only
when a capture hook is set on the last layer does megatron's own static KV path run: it stores keys
before rotation and slices the rotary table by absolute column, so every step then passes the
position ids of all columns so far (kept in a (3, B, capacity) buffer).

Ragged prompts under the Transformer Engine spec: a left-padded prefill needs the padding mask, which
TE's causal kernel ignores, so it would run the project's grouped attention (fp32 scores, gigabytes for
a long video prompt). Instead the prompts are prefilled per group of equal length, unpadded, with TE's
own kernel, and each group's cache columns are copied into the left-padded layout the decode steps use
(:meth:`DecodeSession._prefill_by_length`); decoding stays one batch.
"""

from __future__ import annotations

import torch

from megatron_ral.inference.attention import NewTokenRotary, decode_attention, rotated_cache_supported
from megatron_ral.inference.kv_cache import KVCache
from megatron_ral.inference.pipeline import StageComm
from megatron_ral.inference.prompts import PromptInput, concat_vision
from megatron_ral.models.qwen25vl.vision import VisionEmbeddings


def _pad_token_id(model) -> int:
    special = {model.image_token_id, model.video_token_id}
    return next(i for i in range(len(special) + 1) if i not in special)


def _split_vision(vision: VisionEmbeddings, prompts: list[PromptInput], image_token_id: int,
                  video_token_id: int) -> list[VisionEmbeddings]:
    """Per-prompt slices of the vision features of several prompts (rows in placeholder order)."""
    out, image_at, video_at = [], 0, 0
    for p in prompts:
        ids = p.input_ids.tolist()
        n_img, n_vid = ids.count(image_token_id), ids.count(video_token_id)
        out.append(VisionEmbeddings(
            image=vision.image[image_at: image_at + n_img] if vision.image is not None and n_img else None,
            video=vision.video[video_at: video_at + n_vid] if vision.video is not None and n_vid else None))
        image_at, video_at = image_at + n_img, video_at + n_vid
    return out


def _concat_vision_embeddings(parts: list[VisionEmbeddings]) -> VisionEmbeddings | None:
    def cat(name):
        rows = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return torch.cat(rows) if rows else None

    emb = VisionEmbeddings(image=cat("image"), video=cat("video"))
    return None if emb.image is None and emb.video is None else emb


class DecodeSession:
    """Prefill then one-token steps for a batch of rows; returns last-stage logits (B, V) fp32
    (None on other pipeline stages).

    ``prefill_by_length``: prefill prompts of different lengths per group of equal length (see the module
    docstring); None = when the model runs the Transformer Engine spec with the rotated-key cache."""

    def __init__(self, model, comm: StageComm | None = None, prefill_by_length: bool | None = None):
        if getattr(model.config, "sequence_parallel", False):
            raise NotImplementedError("generation runs without sequence parallelism; build the model with it off")
        self.model = model
        self.comm = comm or StageComm.from_parallel_state()
        param = next(model.parameters())
        self.device = param.device
        self.dtype = model.config.pipeline_dtype or model.config.params_dtype
        self.hidden_size = model.config.hidden_size
        self.cache: KVCache | None = None
        self.positions: torch.Tensor | None = None  # (3, B, capacity)
        self.padding: torch.Tensor | None = None    # (B, capacity) True = padding column
        self.starts: list[int] = []                 # per row, its first real column (host copy of ``padding``)
        self.next_position: torch.Tensor | None = None  # (B,) position of the next token
        self.rotary = NewTokenRotary(model.language_model) if rotated_cache_supported(model) else None
        if prefill_by_length is None:
            prefill_by_length = self.rotary is not None and getattr(model, "backend", "local") == "te"
        self.prefill_by_length = prefill_by_length

    # ------------------------------------------------------------------ state
    @property
    def batch_size(self) -> int:
        return self.positions.shape[1]

    @property
    def length(self) -> int:
        return self.cache.length

    def _mask(self, upto: int, queries: int) -> torch.Tensor | None:
        # decided from the host copy: reading ``padding`` would synchronise with the device every step
        if not any(self.starts):
            return None
        pad = self.padding[:, :upto]
        if queries == 1:
            return pad[:, None, None, :]
        causal = torch.ones(queries, upto, dtype=torch.bool, device=pad.device).triu(upto - queries + 1)
        return causal[None, None] | pad[:, None, None, :]

    def _forward(self, input_ids, upto: int, attention_mask, vision_embeddings=None):
        """Feed ``input_ids`` (B, sq), the tokens of columns [upto - sq, upto)."""
        batch, seq = input_ids.shape
        if not self.comm.is_first:
            hidden = self.comm.recv_activation((seq, batch, self.hidden_size), self.dtype, self.device)
            self.model.set_input_tensor(hidden)
        if self.rotary is not None:
            position_ids = self.positions[:, :, upto - seq: upto]
            self.rotary.set_positions(position_ids)
        else:
            position_ids = self.positions[:, :, :upto]
        with decode_attention(self.model, self.rotary):
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                vision_embeddings=vision_embeddings, inference_context=self.cache.context,
                runtime_gather_output=True,
            )
        if not self.comm.is_last:
            self.comm.send_activation(out)
            return None
        return out[:, -1].float()

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def prefill(self, prompts: list[PromptInput], max_new_tokens: int, vision_embeddings=None) -> torch.Tensor | None:
        """Run the prompts (left-padded) through the model, filling the cache; returns the logits of
        each prompt's next token. The cache has room for ``max_new_tokens - 1`` more columns (the
        last sampled token is never fed back). Vision features are encoded here (first stage) unless
        given, once for all prompts. Prompts of different lengths with ``prefill_by_length``: one
        unpadded prefill per length (:meth:`_prefill_by_length`)."""
        model = self.model
        lengths = [len(p) for p in prompts]
        if self.prefill_by_length and len(set(lengths)) > 1:
            return self._prefill_by_length(prompts, max_new_tokens, vision_embeddings)
        seq = max(lengths)
        capacity = seq + max(max_new_tokens - 1, 0)
        batch = len(prompts)
        if self.rotary is None and not model.core_attention_reads_masks() and min(lengths) != seq:
            # megatron's own path under TE (a capture hook is set): TE's causal attention would ignore
            # the padding mask and padded rows would silently be wrong.
            raise NotImplementedError("prompts of different lengths in one prefill need the project's decode "
                                      "attention (no capture hook set) or the local layer spec")
        dev = self.device
        ids = torch.full((batch, seq), _pad_token_id(model), dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, batch, capacity, dtype=torch.long, device=dev)
        self.padding = torch.zeros(batch, capacity, dtype=torch.bool, device=dev)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=dev)
        self.starts = [seq - n for n in lengths]
        for b, p in enumerate(prompts):
            start = seq - lengths[b]
            ids[b, start:] = p.input_ids.to(dev)
            self.padding[b, :start] = True
            # M-RoPE positions from the prompt where it lives (the host, from the loader): the rope index
            # walks the tokens in Python, which on device tensors would synchronise at every read
            pos, delta = model.compute_position_ids(
                p.input_ids[None], p.image_grid_thw, p.video_grid_thw, p.second_per_grid_ts)
            self.positions[:, b, start:seq] = pos[:, 0].to(dev)
            self.next_position[b] = lengths[b] + int(delta.reshape(-1)[0])
        if self.comm.is_first and vision_embeddings is None:
            vision = concat_vision(prompts)
            if vision["pixel_values"] is not None or vision["pixel_values_videos"] is not None:
                vision_embeddings = model.encode_vision(**vision)
        self.cache = KVCache(batch, capacity)
        logits = self._forward(ids, seq, self._mask(seq, seq), vision_embeddings)
        self.cache.advance(seq)
        return logits

    def _prefill_by_length(self, prompts: list[PromptInput], max_new_tokens: int,
                           vision_embeddings: VisionEmbeddings | None) -> torch.Tensor | None:
        """The state of a left-padded prefill of ``prompts``, built from one unpadded prefill per group of
        equal-length prompts (longest first): each group's cache columns, positions and logits are copied
        into the rows and the last columns they hold in the padded layout. Padding columns stay zero and
        are masked by the decode steps. Peak memory: the batch's cache plus one group's prompt columns."""
        lengths = [len(p) for p in prompts]
        seq, batch = max(lengths), len(prompts)
        capacity = seq + max(max_new_tokens - 1, 0)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        per_prompt = None
        if vision_embeddings is not None:
            per_prompt = _split_vision(vision_embeddings, prompts, self.model.image_token_id,
                                       self.model.video_token_id)
        dev = self.device
        self.positions = torch.zeros(3, batch, capacity, dtype=torch.long, device=dev)
        self.padding = torch.zeros(batch, capacity, dtype=torch.bool, device=dev)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=dev)
        self.starts = [seq - n for n in lengths]
        self.cache = KVCache(batch, capacity)
        memory = self.cache.context.key_value_memory_dict
        logits = None
        for n, rows in sorted(groups.items(), reverse=True):
            part = DecodeSession(self.model, self.comm, prefill_by_length=False)
            emb = None if per_prompt is None else _concat_vision_embeddings([per_prompt[i] for i in rows])
            out = part.prefill([prompts[i] for i in rows], 1, emb)   # cache of exactly n columns
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            start = seq - n
            for layer, (k, v) in part.cache.context.key_value_memory_dict.items():
                if layer not in memory:
                    memory[layer] = (k.new_zeros((capacity, batch, *k.shape[2:])),
                                     v.new_zeros((capacity, batch, *v.shape[2:])))
                memory[layer][0][start:seq].index_copy_(1, index.to(k.device), k[:n])
                memory[layer][1][start:seq].index_copy_(1, index.to(v.device), v[:n])
            self.positions[:, :, start:seq].index_copy_(1, index, part.positions[:, :, :n])
            self.next_position.index_copy_(0, index, part.next_position)
            self.padding[index, :start] = True
            if out is not None:
                logits = out.new_zeros(batch, out.shape[1]) if logits is None else logits
                logits.index_copy_(0, index.to(out.device), out)
            del part
        self.cache.advance(seq)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed one token per row (B,); returns the logits of the following token."""
        col = self.length
        if col >= self.cache.capacity:
            raise RuntimeError(f"KV cache full ({self.cache.capacity} columns)")
        self.positions[:, :, col] = self.next_position
        self.next_position += 1
        logits = self._forward(tokens.reshape(-1, 1).to(self.device), col + 1, self._mask(col + 1, 1))
        self.cache.advance(1)
        return logits

    def select_rows(self, index: torch.Tensor | list[int]) -> None:
        """New row i = old row index[i] (repeat a prompt's row G times, drop finished rows); then drop
        the leading columns that are padding for every remaining row."""
        rows = index.tolist() if isinstance(index, torch.Tensor) else [int(i) for i in index]
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.cache.select_rows(index)
        self.positions = self.positions.index_select(1, index)
        self.padding = self.padding.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        self.starts = [self.starts[i] for i in rows]
        lead = min(self.starts, default=0)
        if lead > 0:
            self.cache.drop_leading(lead)
            self.positions = self.positions[:, :, lead:].contiguous()
            self.padding = self.padding[:, lead:].contiguous()
            self.starts = [s - lead for s in self.starts]
