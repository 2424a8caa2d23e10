"""The bridge between the model and the attention policy: rows p [B, R, T] from a model forward.

    from megatron_ral.attention.capture import AttentionCapture, response_layout

    capture = AttentionCapture(model)                  # any rank; inactive off the last pipeline stage
    layout = response_layout(prompt_lengths, response_lengths, padding_mask=batch["attention_mask"])
    with capture.capture(layout) as result:            # hook installed only inside the block
        output = model(**batch)
    p = result.rows     # float32 [B, R, T] on every TP rank of the last stage, None on other stages

``capture.capture`` installs a hook on the core attention of the model's last decoder layer (built
with ``last_layer_core_attention="capture"``, the provider's default). During the forward the hook
receives the post-RoPE Q and K the layer hands to its attention kernel, gathers the Q rows of the
response tokens, and calls :func:`megatron_ral.attention.attention_policy` with the tensor-parallel
group: each TP rank sums its own heads and the sum is all-reduced, so every rank gets the mean over
all heads. The main attention output is untouched (still the fast kernel). Outside the block the hook
is removed and the model runs as usual.

Gradients. ``grad=None`` (default) follows autograd at entry: inside ``torch.no_grad()`` the rows are
computed without a graph (the p_old / old-policy pass); otherwise they are differentiable w.r.t. Q and
K, hence w.r.t. the last layer's ``linear_qkv`` and everything below it, and a loss on ``result.rows``
back-propagates through the model (also through megatron's pipeline schedule: compute the loss from
the rows in the schedule's ``loss_func`` of the same micro-batch). ``grad=True`` insists on a graph;
``grad=False`` forces a no-grad capture.

Recompute. Do not combine a gradient capture with megatron's selective core-attention recompute
(``recompute_granularity="selective"`` with ``"core_attn"`` in ``recompute_modules``) or with full
layer recompute on the last layer: those run the layer's forward under ``no_grad`` and replay it in
backward, so the rows would have no graph and the attention loss would silently give no gradient.
Entering a gradient capture on such a model (in training mode) raises ``ValueError``; no-grad
captures are fine.

One capture block covers one forward of one micro-batch (the hook refuses a second call). With a
pipeline schedule, open the block inside the ``forward_step`` function around the model call.

Layouts. :func:`response_layout` covers padded batches (left or right padding, given by the
``(B, S)`` padding mask the model takes); :func:`packed_response_layout` a packed THD stream
(one batch entry, several samples back to back, each row seeing only its own sample);
:func:`stream_response_layout` a packed training stream of ``models.qwen25vl.attention_layout`` (packed
``sequences`` or shared-prompt ``groups``), whose rows come out in the padded batch's shape [B, R, T]:
row r of sample b over exactly the keys that sample sees (its prompt and its own earlier tokens, never
another response), equal to the padded path's rows. Any other
:class:`~megatron_ral.attention.layout.RowLayout` can be passed directly.

Context parallelism. Under CP each rank's forward holds a share of the sequence (its queries and keys);
the capture all-gathers the last layer's K over the CP group (differentiable: the gradient of every key
goes back to the rank that holds it), shares the response tokens' Q rows from the ranks that hold them and
computes an even share of the rows (rows c, c + C, ... on CP rank c) against the whole key sequence:
``result.rows`` is then the compact [B, R_c, T] of those rows and ``result.cp``
(:class:`~megatron_ral.attention.cp_rows.CPRows`) says which batch rows they are; per-row values go back to
the batch's [B, R] with ``result.per_row(x)`` (summed over the CP group; identity elsewhere). T is the
padded length of the split (a multiple of 2 * CP; the tail keys are invalid).

Not supported: KV-cache decode steps (the hook needs the full-sequence forward: as many queries as keys).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.cp_rows import CPRows, dealt_rows, pad_keys
from megatron_ral.attention.layout import RowLayout, gather_rows, segment_ids_from_cu_seqlens
from megatron_ral.attention.old_policy import CapturedQK
from megatron_ral.attention.policy import ChunkConfig, attention_policy
from megatron_ral.attention.reference import attention_policy_reference

IMPLEMENTATIONS = ("chunked", "reference")


@dataclass(frozen=True)
class CaptureConfig:
    """How the rows are computed.

    Attributes:
        impl: "chunked" (:func:`attention_policy`, memory-bounded custom backward; the default) or
            "reference" (:func:`attention_policy_reference`, materialises every head's probabilities;
            for tests and debugging).
        chunk: workspace / chunking of the "chunked" implementation.
    """

    impl: str = "chunked"
    chunk: ChunkConfig = ChunkConfig()

    def __post_init__(self) -> None:
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"capture impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")


@dataclass
class CaptureResult:
    """What one capture block produced on this rank.

    Attributes:
        active: this rank holds the model's last decoder layer (last pipeline stage).
        rows: p float32 [B, R, T] (float64 for float64 models) after the forward, on active ranks.
        qk: the captured post-RoPE Q rows [R, B, H_local, d], K [T, B, H_kv_local, d] (detached), the
            layout and softmax scale, when asked with ``keep_qk=True`` (for the "qk" old-policy store).
        calls: how many times the hook ran (1 after a forward on an active rank).
        cp: under context parallelism, which batch rows ``rows`` (and ``qk``) hold (the compact rows of this
            CP rank); None otherwise.
    """

    active: bool
    rows: Tensor | None = None
    qk: CapturedQK | None = None
    calls: int = 0
    cp: CPRows | None = None

    def per_row(self, x: Tensor) -> Tensor:
        """Per-row values [B, R_c] computed from ``rows`` as the batch's [B, R] (under CP: scattered and summed
        over the CP group, differentiable; otherwise ``x`` itself)."""
        return x if self.cp is None else self.cp.full(x)


# ---------------------------------------------------------------------------------------- layouts
def response_layout(
    prompt_lengths: list[int],
    response_lengths: list[int],
    padding_mask: Tensor | None = None,
    seq_len: int | None = None,
) -> RowLayout:
    """Rows = the response tokens of each sample of a padded batch.

    Sample b's real tokens are the positions where ``padding_mask[b]`` is nonzero, in order (left or
    right padding); the first ``prompt_lengths[b]`` of them are the prompt and the next
    ``response_lengths[b]`` the response, whose positions become the rows (padded to the longest
    response; padding rows are invalid). Padding positions are invalid keys. Without a mask the batch
    is right-padded: sample b occupies positions 0 .. prompt_lengths[b] + response_lengths[b] - 1 of
    ``seq_len`` (default: the longest sample).
    """
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(response_lengths)} response lengths")
    batch = len(prompt_lengths)
    if any(p < 0 for p in prompt_lengths) or any(r < 0 for r in response_lengths):
        raise ValueError(f"lengths must be >= 0, got prompts {list(prompt_lengths)}, responses {list(response_lengths)}")
    if padding_mask is None:
        needed = max((p + r for p, r in zip(prompt_lengths, response_lengths)), default=0)
        seq_len = needed if seq_len is None else int(seq_len)
        padding_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
            if p + r > seq_len:
                raise ValueError(f"sample {b}: prompt {p} + response {r} tokens exceed the sequence length {seq_len}")
            padding_mask[b, : p + r] = True
    keep = padding_mask.bool().cpu()
    if keep.dim() != 2 or keep.shape[0] != batch:
        raise ValueError(f"padding_mask must be [B={batch}, S], got shape {tuple(padding_mask.shape)}")
    if seq_len is not None and keep.shape[1] != seq_len:
        raise ValueError(f"padding_mask has {keep.shape[1]} positions, seq_len is {seq_len}")
    rows = max(response_lengths, default=0)
    row_index = torch.zeros(batch, rows, dtype=torch.long)
    row_valid = torch.zeros(batch, rows, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        real = torch.nonzero(keep[b]).flatten()
        if p + r > real.numel():
            raise ValueError(f"sample {b}: prompt {p} + response {r} tokens but only {real.numel()} real positions")
        row_index[b, :r] = real[p : p + r]
        row_valid[b, :r] = True
    return RowLayout(row_index=row_index, row_valid=row_valid, key_valid=keep)


def packed_response_layout(
    prompt_lengths: list[int], response_lengths: list[int], total_length: int | None = None
) -> RowLayout:
    """Rows of a packed stream: samples (prompt then response) back to back in one batch entry.

    Sample j occupies positions cu[j] .. cu[j+1]-1 with cu = cumsum of prompt + response lengths; the
    rows are every sample's response positions in sample order (``[1, sum(response_lengths)]``); a
    row sees only keys of its own sample. Positions past the last sample (``total_length`` padding)
    are invalid keys.
    """
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(response_lengths)} response lengths")
    lengths = [p + r for p, r in zip(prompt_lengths, response_lengths)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    seg = segment_ids_from_cu_seqlens(cu, total_length)
    rows = [torch.arange(int(cu[j]) + p, int(cu[j + 1])) for j, p in enumerate(prompt_lengths)]
    row_index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return RowLayout(row_index=row_index[None], key_valid=(seg >= 0)[None], segment_ids=seg[None])


def stream_response_layout(sample_stream_index: list[Tensor], prompt_lengths: list[int],
                           response_lengths: list[int]) -> RowLayout:
    """Rows of the response tokens of samples packed in one stream, in the padded batch's coordinates.

    ``sample_stream_index[b]`` (int64 [n_b]): the stream position of each token of sample b (its prompt's
    tokens, then its response's; for a shared-prompt group the prompt positions are the same for every
    response of the group); the sample's first ``prompt_lengths[b]`` tokens are its prompt. Rows [B, R] and
    keys [B, T] (T = the longest sample) are those of :func:`response_layout` on the right-padded samples;
    ``stream_index`` maps them to the stream."""
    if not len(sample_stream_index) == len(prompt_lengths) == len(response_lengths):
        raise ValueError("one stream index, prompt length and response length per sample")
    lengths = [int(ix.numel()) for ix in sample_stream_index]
    for b, (n, p, r) in enumerate(zip(lengths, prompt_lengths, response_lengths)):
        if n != p + r:
            raise ValueError(f"sample {b}: {n} stream positions for prompt {p} + response {r} tokens")
    layout = response_layout(list(prompt_lengths), list(response_lengths), seq_len=max(lengths, default=0))
    stream_index = torch.zeros(len(lengths), max(lengths, default=0), dtype=torch.long)
    for b, ix in enumerate(sample_stream_index):
        stream_index[b, : ix.numel()] = ix.long()
        if ix.numel():
            stream_index[b, ix.numel():] = int(ix[0])  # padding keys (invalid): any in-range position
    return RowLayout(layout.row_index, layout.row_valid, layout.key_valid, None, stream_index)


# ---------------------------------------------------------------------------------------- model side
def _unwrap(model):
    """The Qwen25VLModel inside wrappers (DDP, Float16Module: ``.module``) or virtual-pipeline lists."""
    if isinstance(model, (list, tuple)):
        found = [m for m in (_unwrap(c) for c in model) if m.last_layer_core_attention() is not None]
        return found[0] if found else _unwrap(model[0])
    m = model
    while not hasattr(m, "last_layer_core_attention") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "last_layer_core_attention"):
        raise TypeError(f"{type(model).__name__} is not a Qwen25VLModel (no last_layer_core_attention)")
    return m


def _recompute_conflict(model) -> str | None:
    """Name of the activation recompute that would run the last layer's attention under no_grad."""
    cfg = model.config
    if not model.training:
        return None
    if getattr(cfg, "recompute_granularity", None) == "full":
        return "full activation recompute (recompute_granularity='full')"
    layer = model.language_model.decoder.layers[-1]
    if getattr(layer.self_attention, "checkpoint_core_attention", False):
        return "selective core-attention recompute (recompute_granularity='selective', 'core_attn')"
    return None


def _tp_group_default():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _cp_group_default():
    from megatron_ral.models.qwen25vl.context_parallel import context_parallel_state

    return context_parallel_state()[2]


class AttentionCapture:
    """Installs the attention-policy hook on the last decoder layer of ``model`` on demand.

    Args:
        model: a Qwen25VLModel of this rank's pipeline stage (or a DDP / Float16Module wrapper, or the
            list of virtual-pipeline chunks). Ranks without the last layer get an inactive capture
            (``result.active`` False, ``result.rows`` None).
        config: implementation and chunking.
        tp_group: tensor-parallel group of the heads; default megatron's TP group (None if megatron's
            parallel state is not initialised: a single rank).
        cp_group: context-parallel group the sequence is split over; default megatron's (None at CP = 1).
    """

    _UNSET = object()

    def __init__(self, model, config: CaptureConfig = CaptureConfig(), tp_group=_UNSET, cp_group=_UNSET) -> None:
        self.model = _unwrap(model)
        self.config = config
        self.tp_group = _tp_group_default() if tp_group is AttentionCapture._UNSET else tp_group
        self.cp_group = _cp_group_default() if cp_group is AttentionCapture._UNSET else cp_group
        if self.cp_group is not None and dist.get_world_size(self.cp_group) == 1:
            self.cp_group = None
        self.core = self.model.last_layer_core_attention()
        if self.core is not None and not hasattr(type(self.core), "capture_hook"):
            raise ValueError(
                f"the last layer's core attention ({type(self.core).__name__}) has no capture hook: build the "
                "model with last_layer_core_attention='capture' (the provider's default)"
            )

    @property
    def active(self) -> bool:
        """True on the rank(s) holding the last decoder layer (every TP rank of the last stage)."""
        return self.core is not None

    @contextlib.contextmanager
    def capture(
        self, layout: RowLayout, *, grad: bool | None = None, keep_rows: bool = True, keep_qk: bool = False
    ) -> Iterator[CaptureResult]:
        """Hook active for one model forward; yields the :class:`CaptureResult` filled by that forward.

        Args:
            layout: the captured rows of the batch (see :func:`response_layout`).
            grad: rows with an autograd graph (True), without (False), or as autograd is at entry (None).
            keep_rows: compute the rows (False with ``keep_qk`` only stores Q/K, e.g. for the "qk" store).
            keep_qk: also keep the detached Q rows, K, layout and scale in ``result.qk``.
        """
        result = CaptureResult(active=self.active)
        if not self.active:
            yield result
            return
        want_grad = torch.is_grad_enabled() if grad is None else bool(grad)
        if want_grad and keep_rows:
            conflict = _recompute_conflict(self.model)
            if conflict is not None:
                raise ValueError(
                    f"attention capture with gradients cannot run under {conflict}: the last layer's attention "
                    "would run under no_grad; disable that recompute or capture without gradients"
                )
        if self.core.capture_hook is not None:
            raise RuntimeError("a capture hook is already installed on the last layer (nested capture blocks)")

        def hook(query, key, attention_mask, packed_seq_params, softmax_scale):
            if result.calls:
                raise RuntimeError(
                    "the last layer ran twice inside one capture block; use one block per micro-batch forward"
                )
            result.calls += 1
            self._on_forward(result, layout, query, key, softmax_scale, want_grad, keep_rows, keep_qk)

        self.core.capture_hook = hook
        try:
            yield result
        finally:
            self.core.capture_hook = None

    def _on_forward(self, result, layout, query, key, softmax_scale, want_grad, keep_rows, keep_qk) -> None:
        if query.dim() == 3:  # packed THD: [t, heads, d] -> one batch entry
            if self.cp_group is not None:
                raise NotImplementedError("attention capture of THD-packed input under context parallelism")
            query, key = query.unsqueeze(1), key.unsqueeze(1)
        if query.shape[0] != key.shape[0]:
            raise RuntimeError(
                f"attention capture needs a full-sequence forward (got {query.shape[0]} queries for "
                f"{key.shape[0]} keys: a KV-cache step?)"
            )
        if layout.captured_batch_size != query.shape[1]:
            what = "a packed stream (1 batch entry)" if layout.stream_index is not None else \
                f"{layout.batch_size} samples"
            raise ValueError(f"layout has {what}, the forward has {query.shape[1]}")
        if want_grad and keep_rows and not torch.is_grad_enabled():
            raise RuntimeError(
                "attention capture with gradients reached the last layer with autograd disabled (a no_grad "
                "region such as activation recompute); capture with grad=False or disable that recompute"
            )
        with contextlib.nullcontext() if want_grad else torch.no_grad():
            if self.cp_group is not None:
                q_rows, key, host, result.cp = self._cp_rows_and_keys(query, key, layout)
            else:
                layout.validate(key.shape[0])
                host = layout  # as given (the trainer's is on the host): attention_policy plans its chunks from it
                q_rows = gather_rows(query, layout.to(query.device))
            if keep_qk:
                result.qk = CapturedQK(q=q_rows.detach(), k=key.detach(), layout=host, softmax_scale=softmax_scale)
            if keep_rows:
                result.rows = self._policy(q_rows, key, host, softmax_scale, want_grad)

    def _cp_rows_and_keys(self, query: Tensor, key: Tensor, layout: RowLayout):
        """The query rows this CP rank computes (dealt out evenly over the group, see ``cp_rows``), the whole key
        sequence (all-gathered, differentiable), the compact layout over it and the :class:`CPRows`."""
        from megatron_ral.models.qwen25vl.context_parallel import CPShare, gather_sequence_cp

        size = dist.get_world_size(self.cp_group)
        share = CPShare(size, dist.get_rank(self.cp_group), self.cp_group, key.shape[0] * size)
        keys = gather_sequence_cp(key, self.cp_group)
        if layout.stream_index is None:  # (a packed stream's layout is over its samples' own keys)
            layout = pad_keys(layout, share.length)
        layout.validate(share.length)
        q_rows, rows, compact = dealt_rows(query, layout, share)  # layout where it is (the host, for the trainer)
        return q_rows, keys, compact, rows

    def _policy(self, q_rows: Tensor, key: Tensor, layout: RowLayout, scale: float, want_grad: bool) -> Tensor:
        group = self.tp_group
        if group is not None and dist.is_initialized() and dist.get_world_size(group) == 1:
            group = None
        if self.config.impl == "reference":
            return attention_policy_reference(q_rows, key, layout, scale, tp_group=group)
        return attention_policy(q_rows, key, layout, scale, tp_group=group, chunk=self.config.chunk,
                                require_grad=want_grad)
