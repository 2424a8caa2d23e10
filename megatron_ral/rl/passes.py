"""The no-grad passes over a rollout batch before the updates: old policy, reference and teacher.

old pass      weights that generated the rollouts: old log-probs of the response tokens and, for RAL,
              p_old (kept in an old-policy store, see ``attention.old_policy``); attention diagnostics
              (entropy, vision mass) of the rollout policy come from the same capture.
ref pass      the frozen initial weights (``rl.reference``): reference log-probs for the k3 KL term.
teacher pass  the distillation teacher (``distill.teacher``, a second model): on the same micro-batches
              (same token ids, the teacher's own vision features), its last-layer attention rows p_phi
              into a store like p_old, and what GKD keeps of its vocab-parallel logits at the response
              positions (the top-k + tail, or the logits themselves for one mini-batch).

The old and reference passes write per-micro-batch tensors into the :class:`RolloutBatch`, the teacher
pass into the store and dict it is given (last pipeline stage only); each returns its metric sums.
"""

from __future__ import annotations

import torch

from typing import Callable

from megatron_ral.attention.metrics import attention_entropy, attention_mass_shares
from megatron_ral.rl.batch import MicroBatch, RolloutBatch
from megatron_ral.rl.schedule import PassContext, run_pass


DIAGNOSTIC_PROMPTS = 2  # the attention diagnostics cover the responses of the step's first global prompts


def diagnostic_sequences(batch: RolloutBatch, mb: MicroBatch, prompts: int = DIAGNOSTIC_PROMPTS) -> torch.Tensor:
    """bool [B]: the micro-batch's sequences that answer one of the step's first ``prompts`` global prompts
    (the same sequences whatever the layout or micro-batch size)."""
    return torch.tensor([batch.prompt_keys[r.prompt] < prompts for r in mb.refs], dtype=torch.bool)


def _pad_keys(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """A [B, S] key mask over ``keys`` >= S keys (the tail padding of a context-parallel split: False)."""
    return torch.nn.functional.pad(mask, (0, keys - mask.shape[1]), value=False) if keys > mask.shape[1] else mask


def has_diagnostic_sequences(batch: RolloutBatch, mb: MicroBatch, prompts: int = DIAGNOSTIC_PROMPTS) -> bool:
    """Whether :func:`diagnostic_sequences` selects any sequence (decided on the host, no tensor read)."""
    return any(batch.prompt_keys[r.prompt] < prompts for r in mb.refs)


def attention_diagnostics(rows: torch.Tensor, mb: MicroBatch, image_token_id: int, video_token_id: int,
                          sequences: torch.Tensor | None = None, per_row=None) -> dict:
    """Sums over the counted response tokens (of ``sequences`` [B] when given): attention entropy and
    vision / text / response mass, as 0-d tensors on the rows' device (read once per step). ``per_row``
    (``CaptureResult.per_row``) maps per-row values of the captured rows to the batch's [B, R] (context
    parallelism: this rank's rows summed over the CP group)."""
    valid = mb.response_mask & (mb.weight[:, None] > 0)
    if sequences is not None:
        valid = valid & sequences[:, None]
    valid = valid.to(rows.device)
    keys = mb.attention_mask.bool()
    resp = torch.zeros_like(keys)
    for b, (p, r) in enumerate(zip(mb.prompt_lengths, mb.response_lengths)):
        resp[b, p: p + r] = True
    width = rows.shape[-1]
    shares = attention_mass_shares(
        rows.float(), _pad_keys(mb.vision_mask(image_token_id, video_token_id), width).to(rows.device),
        _pad_keys(resp, width).to(rows.device))
    ent = attention_entropy(rows.float())
    if per_row is not None:
        shares = {k: per_row(v) for k, v in shares.items()}
        ent = per_row(ent)

    def total(x):
        return torch.where(valid, x, torch.zeros_like(x)).sum()

    return {"attn/entropy": total(ent), "attn/vision_mass": total(shares["vision"]),
            "attn/text_mass": total(shares["text"]), "attn/response_mass": total(shares["response"]),
            "attn/tokens": valid.sum()}


def old_pass(ctx: PassContext, batch: RolloutBatch, store, image_token_id: int, video_token_id: int) -> list[dict]:
    """Old log-probs (and p_old into ``store`` when given) for every micro-batch of ``batch``; the
    attention diagnostics of the rollout policy from the responses to the step's first global prompts
    (a sample: rows cost a capture each, which GRPO needs for nothing else)."""

    def capture_kwargs(mb):
        rows = has_diagnostic_sequences(batch, mb) or (store is not None and store.config.mode == "rows")
        qk = store is not None and store.config.mode == "qk"
        if not (rows or qk):
            return None
        return {"grad": False, "keep_rows": rows, "keep_qk": qk}

    def consume(mb, token_loss, result):
        batch.old_logprobs[mb.index] = mb.token_logprobs(token_loss).detach().float()
        metrics = {}
        if result is not None and result.active:
            if store is not None:
                if store.config.mode == "qk":
                    store.put(mb.index, result.qk)
                else:
                    store.put_rows(mb.index, result.rows)
            if result.rows is not None and has_diagnostic_sequences(batch, mb):
                metrics = attention_diagnostics(result.rows, mb, image_token_id, video_token_id,
                                                diagnostic_sequences(batch, mb), result.per_row)
        return None, metrics

    return run_pass(ctx, batch.micro_batches, consume, forward_only=True, capture_kwargs=capture_kwargs)


def reference_pass(ctx: PassContext, batch: RolloutBatch, reference) -> list[dict]:
    """Reference log-probs of every micro-batch, with the reference weights swapped in."""

    def consume(mb, token_loss, result):
        batch.ref_logprobs[mb.index] = mb.token_logprobs(token_loss).detach().float()
        return None, {}

    with reference.active():
        return run_pass(ctx, batch.micro_batches, consume, forward_only=True)


def teacher_pass(ctx: PassContext, micro_batches: list[MicroBatch], rows_store=None, gkd_out: dict | None = None,
                 gkd_targets: Callable | None = None) -> list[dict]:
    """The teacher's no-grad forward over ``micro_batches`` (``ctx``: the teacher's chunks, vision features
    and capture, the sampling temperature).

    ``rows_store`` (an old-policy store, any mode): p_phi of every micro-batch not yet in it, from the
    teacher's last-layer capture (its heads, reduced over TP). ``gkd_out``: ``gkd_targets(logits)`` of each
    micro-batch, keyed by ``MicroBatch.index``, from the teacher's vocab-parallel logits at the response
    positions [B, R, V/TP] (unscaled; e.g. its top-k + tail, or the logits themselves).
    """
    want_logits = gkd_out is not None

    def capture_kwargs(mb):
        if rows_store is None or mb.index in rows_store:
            return None
        qk = rows_store.config.mode == "qk"
        return {"grad": False, "keep_rows": not qk, "keep_qk": qk}

    def consume(mb, token_loss, result, logits=None):
        if rows_store is not None and result is not None and result.active and mb.index not in rows_store:
            if rows_store.config.mode == "qk":
                rows_store.put(mb.index, result.qk)
            else:
                rows_store.put_rows(mb.index, result.rows)
        if want_logits:
            gkd_out[mb.index] = gkd_targets(mb.to_rows(logits.detach()))  # [B, R, V/TP] (packed: scattered)
        return None, {}

    return run_pass(ctx, micro_batches, consume, forward_only=True, capture_kwargs=capture_kwargs,
                    return_logits=want_logits)
