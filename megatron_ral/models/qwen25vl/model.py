"""Qwen2.5-VL on megatron-core: frozen vision tower + GPTModel language model with M-RoPE.

Parameter names (see contracts): ``vision_model.*`` = HF ``visual.*`` (first pipeline stage only),
``language_model.*`` = megatron GPTModel names.

Pipeline parallelism: every stage gets the same batch (input_ids, grids, ...) so that each stage
computes the M-RoPE position ids itself; the first stage embeds tokens and vision features, later
stages take the previous stage's hidden states through :meth:`set_input_tensor`.

Context parallelism (``context_parallel_size = C``, training and scoring forwards): every CP rank gets the
same batch; the sequence is right-padded to a multiple of 2C, the vision tower's work is split over the CP
group (features all-gathered), and each rank embeds only its share of the tokens (megatron's load-balanced
split, ``context_parallel.CPShare``) and runs the decoder on it with the GLOBAL M-RoPE position ids
(megatron's rotary embedding slices them per CP rank the same way); the core attention all-gathers K/V.
The per-token loss is computed by each rank at the positions it holds and summed over the CP group
(``context_parallel.reduce_from_cp``). Generation (``inference_context``) never splits.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ral.models.qwen25vl.context_parallel import CPShare, cp_padded_length, reduce_from_cp
from megatron_ral.models.qwen25vl.hf_config import LMArchitecture, padded_vocab_size
from megatron_ral.models.qwen25vl.rope_index import RopeIndexConfig, get_rope_index
from megatron_ral.models.qwen25vl.vision import (
    VisionEmbeddings,
    build_vision_tower,
    encode_vision,
    merge_vision_embeddings,
    select_vision_features,
)


def attention_mask_from_padding(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Megatron attention mask from an HF (B, S) padding mask (1 = real token).

    Returns None (plain causal attention) when there is no padding or the padding is only on the
    right: causal attention is then exact for every real token. Otherwise a (B, 1, S, S) bool mask,
    True = masked: the causal upper triangle plus every padding key.
    """
    if padding_mask is None:
        return None
    keep = padding_mask.bool()
    if keep.all():
        return None
    # right padding only: each row is 1...1 0...0
    if not (keep[:, 1:] & ~keep[:, :-1]).any():
        return None
    seq = keep.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=keep.device).triu(1)
    return causal[None, None] | ~keep[:, None, None, :]


class Qwen25VLModel(MegatronModule):
    """Vision tower (first stage) + megatron GPTModel decoder with M-RoPE."""

    def __init__(
        self,
        config: TransformerConfig,
        hf_config,
        block_spec: TransformerBlockSubmodules,
        pre_process: bool = True,
        post_process: bool = True,
        vision_attn_implementation: str = "sdpa",
        rope_text_after_vision: str = "max_position",
        vp_stage: int | None = None,
        parallel_output: bool = True,
        backend: str = "local",
    ) -> None:
        super().__init__(config=config)
        arch = LMArchitecture.from_hf(hf_config)
        self.hf_config = hf_config
        self.arch = arch
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = arch.vocab_size
        self.padded_vocab_size = padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size)
        self.share_embeddings_and_output_weights = arch.tie_word_embeddings
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.rope_config = RopeIndexConfig.from_hf_config(hf_config, text_after_vision=rope_text_after_vision)
        self.backend = backend

        self.vision_model = None
        if pre_process:
            self.vision_model = build_vision_tower(
                hf_config.vision_config, attn_implementation=vision_attn_implementation,
                dtype=config.params_dtype,
            )
            if torch.cuda.is_available():
                self.vision_model.cuda(torch.cuda.current_device())

        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=self.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=arch.rope_theta,
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )

    # ------------------------------------------------------------------ megatron plumbing
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def last_layer_core_attention(self):
        """Core attention of the model's last decoder layer if this rank holds it, else None."""
        if not self.post_process:
            return None
        layers = self.language_model.decoder.layers
        if len(layers) == 0 or layers[-1].layer_number != self.config.num_layers:
            return None
        return layers[-1].self_attention.core_attention

    def core_attention_reads_masks(self) -> bool:
        """Whether the core attention of this stage's layers applies an ``attention_mask``: megatron's
        local module does; Transformer Engine's, built with the causal mask type, ignores it. A module
        swapped in for generation may declare ``reads_attention_mask`` (inference.attention does)."""
        layers = self.language_model.decoder.layers
        if len(layers) and all(getattr(l.self_attention.core_attention, "reads_attention_mask", False) for l in layers):
            return True
        return self.backend != "te"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_model is not None:
            self.vision_model.eval()  # the tower is frozen
        return self

    # ------------------------------------------------------------------ inputs
    def compute_position_ids(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, S) M-RoPE position ids and (B, 1) rope deltas of a prompt batch."""
        return get_rope_index(
            input_ids, self.rope_config, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
        )

    def encode_vision(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        split_over_cp: bool = False,
    ) -> VisionEmbeddings:
        """Vision features of a batch (first pipeline stage only); reusable across responses.

        ``split_over_cp``: every rank of this rank's context-parallel group holds the same batch; each encodes a
        share of the frames and the features are all-gathered (the same features, a C-th of the tower's work)."""
        if self.vision_model is None:
            raise RuntimeError("encode_vision is only available on the first pipeline stage")
        group = None
        if split_over_cp and self.config.context_parallel_size > 1:
            group = parallel_state.get_context_parallel_group()
        return encode_vision(self.vision_model, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                             group=group)

    def embed(
        self, input_ids: torch.Tensor, vision_embeddings: VisionEmbeddings | None, check_placeholders: bool = True,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(S, B, H) decoder input: token embeddings with vision features merged in.

        Without vision embeddings, placeholder tokens are an error unless ``check_placeholders`` is
        False (decode steps, where a sampled token id is only text). ``token_index`` (context parallelism):
        embed only the tokens at these positions of ``input_ids`` (the vision features of the whole batch are
        given; the rows of those positions are merged), giving (len(token_index), B, H)."""
        ids = input_ids if token_index is None else input_ids.index_select(1, token_index.to(input_ids.device))
        emb = self.language_model.embedding(input_ids=ids, position_ids=None)
        if vision_embeddings is not None:
            if token_index is not None:
                vision_embeddings = select_vision_features(vision_embeddings, input_ids, token_index,
                                                           self.image_token_id, self.video_token_id)
            emb = merge_vision_embeddings(
                emb, ids, vision_embeddings.to(device=emb.device, dtype=emb.dtype),
                self.image_token_id, self.video_token_id,
            )
        elif check_placeholders:
            n_vis = int(((input_ids == self.image_token_id) | (input_ids == self.video_token_id)).sum())
            if n_vis:
                raise ValueError(
                    f"input_ids hold {n_vis} image/video placeholder tokens but no pixel values or vision embeddings were given"
                )
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    @contextlib.contextmanager
    def _decoder_output(self):
        """The GPTModel returns its decoder's output (final norm applied) instead of logits inside the block."""
        lm = self.language_model
        saved = lm.post_process
        lm.post_process = False
        try:
            yield
        finally:
            lm.post_process = saved

    def output_logits(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits (B, R, V/TP) of the decoder output ``hidden`` (S, B, H) at positions
        ``index`` (B, R): GPTModel's output layer (tied weights included) on the selected rows only."""
        idx = index.to(hidden.device).transpose(0, 1)  # (R, B)
        rows = hidden.gather(0, idx[..., None].expand(-1, -1, hidden.shape[-1]))  # (R, B, H)
        return self._output_layer(rows).transpose(0, 1).contiguous()  # (B, R, V/TP)

    def _output_layer(self, rows: torch.Tensor) -> torch.Tensor:
        """GPTModel's output layer (tied weights included) on hidden rows (R, B, H): logits (R, B, V/TP)."""
        lm = self.language_model
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        logits, _ = lm.output_layer(rows, weight=weight, runtime_gather_output=False)
        return logits

    @staticmethod
    def _token_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    keep_input: bool = False) -> torch.Tensor:
        """Per-token -log softmax(logits / T)[label] of vocab-parallel logits (padded vocabulary masked already);
        ``keep_input``: leave ``logits`` untouched (megatron's cross-entropy shifts its input in place)."""
        scaled = logits.float()
        if temperature != 1.0:
            scaled = scaled / temperature
        elif keep_input and scaled is logits:
            scaled = scaled.clone()
        return tensor_parallel.vocab_parallel_cross_entropy(scaled, labels)

    def _cp_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, loss_index: torch.Tensor, share: CPShare,
                       temperature: float, return_logits: bool = False, labels_at_index: bool = False):
        """Per-token loss (B, R) at the global positions ``loss_index`` from this CP rank's decoder output
        ``hidden`` (S/C, B, H): each rank computes the output layer and the loss at the positions it holds, the
        (B, R) tensors are summed over the CP group (gradient: identity, see ``context_parallel``). ``labels``
        (B, S) or, with ``labels_at_index``, the targets at ``loss_index`` (B, R). With
        ``return_logits`` also the (B, R, V/TP) logits, put together the same way (every CP rank holds them all,
        as at CP = 1; the all-reduce moves B x R x V/TP values)."""
        index = loss_index.to(hidden.device).long()
        local = share.local_index(index)
        owned = local >= 0
        b_idx, r_idx = owned.nonzero(as_tuple=True)
        rows = hidden[local[owned], b_idx]  # (n, H)
        if labels_at_index and tuple(labels.shape) != tuple(index.shape):
            raise ValueError(f"labels_at_index: labels {tuple(labels.shape)} must have loss_index's shape "
                             f"{tuple(index.shape)}")
        targets = (labels.to(hidden.device) if labels_at_index else labels.to(hidden.device).gather(1, index))[owned]
        logits = self.mask_padded_vocab(self._output_layer(rows[:, None]))  # (n, 1, V/TP)
        loss = self._token_loss(logits, targets[:, None], temperature, keep_input=return_logits)[:, 0]
        full = torch.zeros(index.shape, dtype=loss.dtype, device=loss.device).index_put((b_idx, r_idx), loss)
        token_loss = reduce_from_cp(full, share.group)
        if not return_logits:
            return token_loss
        every = logits.new_zeros(*index.shape, logits.shape[-1]).index_put((b_idx, r_idx), logits[:, 0])
        return token_loss, reduce_from_cp(every, share.group)

    def mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of padded vocabulary entries (index >= vocab_size) to the dtype minimum."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        if width == self.padded_vocab_size:
            start = 0
        else:
            start = parallel_state.get_tensor_model_parallel_rank() * width
        cols = torch.arange(start, start + width, device=logits.device)
        return logits.masked_fill(cols >= self.vocab_size, torch.finfo(logits.dtype).min)

    # ------------------------------------------------------------------ forward
    def _layout_inputs(self, layout, input_ids, position_ids, attention_mask, packed_seq_params):
        """(position_ids, packed_seq_params) of a forward over an attention layout's stream."""
        from megatron_ral.models.qwen25vl.core_attention import LayoutParams

        if attention_mask is not None:
            raise ValueError("an attention layout defines which keys each token sees: pass attention_mask=None with it")
        if packed_seq_params is not None:
            raise ValueError("pass either an attention layout or packed_seq_params, not both")
        if input_ids is not None and tuple(input_ids.shape) != (layout.batch_size, layout.length):
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} do not hold the layout's stream "
                             f"(b={layout.batch_size}, L={layout.length})")
        if position_ids is None:
            position_ids = layout.position_ids
        cp = self.config.context_parallel_size
        if layout.kind == "none" and (cp == 1 or self.backend == "te"):
            return position_ids, None
        if self.backend == "te" and (layout.kind != "sequences" or cp > 1):
            raise ValueError(f"a {layout.kind!r} attention layout{' with context parallelism' if cp > 1 else ''} needs "
                             "the local layer spec (model.layer_spec: local); the Transformer Engine spec reads "
                             "'sequences' layouts only, without context parallelism (te_core_attention)")
        return position_ids, LayoutParams(layout=layout)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        vision_embeddings: VisionEmbeddings | None = None,
        inference_context=None,
        runtime_gather_output: bool | None = None,
        packed_seq_params=None,
        extra_block_kwargs: dict | None = None,
        temperature: float = 1.0,
        loss_index: torch.Tensor | None = None,
        layout=None,
        labels_at_index: bool = False,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, S, V) — vocab-sharded over TP unless gathered — or per-token loss (B, S)
        when ``labels`` are given; on non-last pipeline stages the hidden states (S, B, H).

        ``attention_mask``: an HF (B, S) padding mask (1 = real token), a megatron (B, 1, S, S)
        bool mask (True = masked), or None (causal). With the Transformer Engine spec only None and
        right padding are accepted (a ValueError otherwise: TE's causal layers would ignore the mask),
        except during generation, whose core attention applies masks. ``position_ids`` (3, B, S) are
        computed from input_ids / grids / second_per_grid_ts / padding when None (prompt-style inputs;
        pass them explicitly for KV-cache decode steps). ``vision_embeddings`` replaces pixel inputs with
        features from :meth:`encode_vision` (e.g. computed once for G responses of a prompt).
        ``temperature`` divides the logits before the per-token loss (log-probs of the sampling
        distribution softmax(logits / T)); logits are returned unscaled. ``loss_index`` (B, R) (with
        ``labels``): compute the output layer and the loss only at these positions and return the loss
        (B, R) of ``labels.gather(1, loss_index)`` (the output layer over a 152k vocabulary is most of a
        small model's cost; a trainer needs the response positions only). Without sequence parallelism.
        ``labels_at_index`` (with ``loss_index``): ``labels`` are already the targets at ``loss_index`` (same
        shape), so one position may carry several targets (a shared prompt's last token predicts the first
        token of each of its responses).
        ``layout`` (an ``AttentionLayout``, local layer spec): the batch is that layout's stream (input_ids
        (b, L); one row for packed ``sequences`` / ``groups``); its position ids are used unless
        ``position_ids`` are given, its visibility rule replaces ``attention_mask`` (which must be None).
        ``return_logits`` (with ``labels``, last stage): return ``(token_loss, logits)``, the logits being the
        vocab-parallel (B, R, V/TP) logits the loss was computed from (at ``loss_index`` when given), padded
        vocabulary entries masked, *not* divided by ``temperature`` (a consumer scales them itself, as the
        distillation losses do with the same temperature); they keep the graph, so a loss on them
        back-propagates like the per-token loss.

        Context parallelism (CP = C > 1, no ``inference_context``): every CP rank passes the whole batch
        (right padding or a layout; a left-padded mask is refused); a sequence whose length is not a multiple
        of 2C is right-padded to one (a layout must be built with ``pad_to_multiple=2C``). With ``labels`` the
        per-token loss (B, R) (or (B, S) without ``loss_index``) is the whole one on every CP rank (each rank
        computes its own positions, summed over the group). Without labels the logits are this rank's share
        (B, S'/C, V): the tokens ``context_parallel.CPShare.current(S').indices()`` of the padded length S'.
        """
        if layout is not None:
            position_ids, packed_seq_params = self._layout_inputs(
                layout, input_ids, position_ids, attention_mask, packed_seq_params)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if input_ids is None:
                raise ValueError("position_ids are computed from input_ids: pass input_ids on every pipeline stage")
            position_ids, _ = self.compute_position_ids(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, padding_mask
            )
        if padding_mask is not None:
            attention_mask = attention_mask_from_padding(padding_mask)
            if attention_mask is not None and not self.core_attention_reads_masks():
                raise ValueError(
                    "left/inner padding needs an attention mask, which the Transformer Engine layer spec ignores "
                    "(its layers apply their causal mask type only); right-pad the batch (causal attention is then "
                    "exact for real tokens) or use the local layer spec"
                )
        elif attention_mask is not None and not self.core_attention_reads_masks():
            raise ValueError(
                "a 4-D attention_mask was given, but the Transformer Engine layer spec would ignore it (its layers "
                "apply their causal mask type only; TE reads a mask only for padding/arbitrary mask types); pass "
                "None for causal attention, right-pad instead of masking, or use the local layer spec"
            )

        share = None
        if self.config.context_parallel_size > 1 and inference_context is None:
            if attention_mask is not None:
                raise ValueError(
                    "context parallelism needs right-padded batches (causal attention) or an attention layout: "
                    "left/inner padding and explicit attention masks are not split over CP ranks")
            if labels is not None and loss_index is None:  # the loss of every position, computed where it is held
                loss_index = torch.arange(labels.shape[1], device=labels.device).expand(labels.shape[0], -1)
            share, input_ids, position_ids, padded_labels = self._cp_inputs(input_ids, position_ids, labels, layout)
            labels = labels if labels_at_index else padded_labels

        decoder_input = None
        if self.pre_process:
            if vision_embeddings is None and (pixel_values is not None or pixel_values_videos is not None):
                vision_embeddings = self.encode_vision(
                    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, split_over_cp=share is not None
                )
            decoder_input = self.embed(input_ids, vision_embeddings, check_placeholders=inference_context is None,
                                       token_index=None if share is None else share.indices(input_ids.device))

        selective = loss_index is not None and labels is not None and self.post_process
        if selective and self.config.sequence_parallel:
            raise NotImplementedError("loss_index needs the hidden states of the whole sequence (no sequence parallelism)")
        with self._decoder_output() if selective else contextlib.nullcontext():
            output = self.language_model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                decoder_input=decoder_input,
                labels=None,
                inference_context=inference_context,
                runtime_gather_output=False if labels is not None else runtime_gather_output,
                packed_seq_params=packed_seq_params,
                extra_block_kwargs=extra_block_kwargs,
            )
        if not self.post_process:
            return output
        if selective and share is not None:
            return self._cp_token_loss(output, labels, loss_index, share, temperature, return_logits, labels_at_index)
        if selective:
            output = self.output_logits(output, loss_index)
            if not labels_at_index:
                labels = labels.gather(1, loss_index.to(labels.device))
            elif tuple(labels.shape) != tuple(loss_index.shape):
                raise ValueError(f"labels_at_index: labels {tuple(labels.shape)} must have loss_index's shape "
                                 f"{tuple(loss_index.shape)}")
        if labels is None:
            return self.mask_padded_vocab(output)
        logits = self.mask_padded_vocab(output)
        token_loss = self._token_loss(logits, labels, temperature, keep_input=return_logits)
        return (token_loss, logits) if return_logits else token_loss

    def _cp_inputs(self, input_ids, position_ids, labels, layout):
        """(CPShare, input_ids, position_ids, labels) of a context-parallel forward: the stream right-padded to a
        multiple of 2 * CP (pad tokens after every real token: causal attention never shows them to one)."""
        cp = self.config.context_parallel_size
        length = int(position_ids.shape[-1])
        padded = cp_padded_length(length, cp)
        if padded != length:
            if layout is not None:
                raise ValueError(f"an attention layout of {length} tokens does not split over {cp} context-parallel "
                                 f"ranks: build it with pad_to_multiple={2 * cp}")
            extra = padded - length
            if input_ids is not None:
                input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=self._text_pad_id())
            position_ids = torch.nn.functional.pad(position_ids, (0, extra), value=0)
            if labels is not None:
                labels = torch.nn.functional.pad(labels, (0, extra), value=0)
        return CPShare.current(padded), input_ids, position_ids, labels

    def _text_pad_id(self) -> int:
        """A token id that is not an image/video placeholder (for the tail padding of a CP split)."""
        return next(i for i in range(3) if i not in (self.image_token_id, self.video_token_id))
