"""Attention policy of the last LM layer (RAL, paper Eq. 2): capture, divergences, storage, diagnostics.

Interface the model calls
-------------------------
A capture hook on the last decoder layer's core attention, on the last pipeline stage, receives the
post-RoPE query and key tensors that core attention receives (Megatron layout ``[s, b, heads, d]``;
for packed THD inputs ``[t, heads, d]``, unsqueeze a batch dim of 1) and calls

    p = attention_policy(q_rows, k, layout, softmax_scale, tp_group=tp_group, require_grad=training)

with
    q_rows  [R, B, H_local, d]     queries of the captured rows only; ``gather_rows(q, layout)`` selects
                                   them from the full [T, B, H_local, d] query tensor (differentiable).
    k       [T, B, H_kv_local, d]  keys of the whole sequence (GQA: H_local a multiple of H_kv_local,
                                   query head h uses KV head h // (H_local / H_kv_local), Megatron's order).
    layout  RowLayout:
              row_index   int64 [B, R]  key index (0..T-1 in k) of each captured row: the response tokens.
              row_valid   bool [B, R]   False for padding rows (shorter responses); optional.
              key_valid   bool [B, T]   False for padding keys; optional.
              segment_ids int64 [B, T]  packed sequences, from cu_seqlens via
                                        ``segment_ids_from_cu_seqlens``; a row sees only its own segment.
    softmax_scale                   the layer's scale (Megatron's ``softmax_scale``, default 1/sqrt(d)).
    tp_group                        tensor-parallel group (heads split across its ranks); None at TP=1.

and gets ``p`` float32 [B, R, T] (float64 for float64 inputs), identical on all TP ranks: row r is the
head-mean attention of the token at key index t = row_index[b, r] over the keys i < t it may see,
renormalised to sum to 1 (own position dropped after the head mean). Zero elsewhere and for invalid
rows. Differentiable w.r.t. q and k with a backward that recomputes per-head probabilities in chunks
(no H x R x T storage). The loss on p must be computed identically on every TP rank.

Rules for the hook: run it only when a loss or metric needs the rows; run it outside megatron's
selective core-attention recompute (that region runs under no_grad); the main attention output still
comes from the fast kernel, the capture only reads q and k.

In the model
------------
``AttentionCapture(model, CaptureConfig(), tp_group)`` installs the hook on the last layer of the last
pipeline stage and, within ``with capture.capture(layout) as result:`` around one forward, leaves p in
``result.rows``; ``response_layout`` / ``packed_response_layout`` build the layout of a padded or packed
batch of prompt + response sequences, ``stream_response_layout`` that of a packed training stream (packed
sequences or shared-prompt groups; rows in the padded batch's shape).

Other pieces
------------
    jsd / kl_divergence / divergence / aggregate_tokens   per-token divergences, token aggregation
    attention_entropy / attention_mass_shares / attention_metrics   diagnostics from the rows
    OldPolicyConfig / make_old_policy_store / CapturedQK   keeping p_old between the old pass and updates
    attention_policy_reference   eager reference (materialises all heads), for tests and benchmarks
"""

from megatron_ral.attention.capture import (
    AttentionCapture,
    CaptureConfig,
    CaptureResult,
    packed_response_layout,
    response_layout,
    stream_response_layout,
)
from megatron_ral.attention.divergence import aggregate_tokens, divergence, jsd, kl_divergence
from megatron_ral.attention.layout import (
    RowLayout,
    gather_rows,
    response_row_layout,
    sample_keys,
    segment_ids_from_cu_seqlens,
)
from megatron_ral.attention.metrics import attention_entropy, attention_mass_shares, attention_metrics
from megatron_ral.attention.old_policy import (
    CapturedQK,
    OldPolicyConfig,
    OldPolicyStore,
    make_old_policy_store,
)
from megatron_ral.attention.policy import ChunkConfig, attention_policy
from megatron_ral.attention.reference import attention_policy_reference

__all__ = [
    "AttentionCapture",
    "CaptureConfig",
    "CaptureResult",
    "packed_response_layout",
    "response_layout",
    "stream_response_layout",
    "CapturedQK",
    "ChunkConfig",
    "OldPolicyConfig",
    "OldPolicyStore",
    "RowLayout",
    "aggregate_tokens",
    "attention_entropy",
    "attention_mass_shares",
    "attention_metrics",
    "attention_policy",
    "attention_policy_reference",
    "divergence",
    "gather_rows",
    "jsd",
    "kl_divergence",
    "make_old_policy_store",
    "response_row_layout",
    "sample_keys",
    "segment_ids_from_cu_seqlens",
]
