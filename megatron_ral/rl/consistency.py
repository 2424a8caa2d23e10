"""Rollout/trainer log-prob consistency: the generator's log-probs against the trainer's for the same weights.

Generation reports, for every sampled token, log softmax(logits / T) at that token; the old pass (or, with
one update per rollout and no old pass, the update's first forward) recomputes the same quantity with the
same weights through the training forward. Both are the same function, so any difference is numerical
(a KV-cache decode against a full-sequence forward: other kernels, other reduction orders, rounding of
the activations) or a bug (positions, vision features, masking or weights that differ between the two).
The step logs ``rollout/logprob_diff_max`` and ``rollout/logprob_diff_mean`` over the counted response
tokens; :class:`LogprobDiffWarning` warns once per run when the largest difference passes
``algorithm.logprob_diff_warn``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_ral.rl.batch import MicroBatch, RolloutBatch
from megatron_ral.rl.metrics import MetricSums

log = logging.getLogger("megatron_ral.train")

# Default warning thresholds on rollout/logprob_diff_max by training dtype (see AlgorithmConfig). Measured on
# the quickstart (tiny model, CPU, 16 prompts x 8 responses): max ~3e-6 / mean ~2.5e-7 in fp32, max 0.04-0.08 /
# mean 1e-3-2e-3 in bf16. Larger models and longer responses widen the rounding tail; a bug (positions,
# vision features, stale weights) moves log-probs by whole nats.
DEFAULT_WARN = {"fp32": 1e-3, "bf16": 1.0, "fp16": 0.25}


def logprob_diff(generated: Tensor, trained: Tensor, valid: Tensor) -> tuple[float, float, float]:
    """(sum, max, count) of |generated - trained| over the tokens where ``valid`` [B, R] is True (float64)."""
    d = (generated.double() - trained.detach().double().to(generated.device)).abs()
    d = d[valid.to(d.device)]
    if d.numel() == 0:
        return 0.0, 0.0, 0.0
    return float(d.sum()), float(d.max()), float(d.numel())


def rollout_logprobs(batch: RolloutBatch, mb: MicroBatch) -> Tensor:
    """The generator's log-probs of a micro-batch's response tokens, aligned like its token rows [B, R]
    (0 beyond each response)."""
    out = torch.zeros(mb.response_mask.shape, dtype=torch.float32)
    for b, ref in enumerate(mb.refs):
        lp = batch.rollout_logprobs[ref.prompt][ref.sample]
        out[b, : lp.numel()] = lp
    return out


def consistency_sums(batch: RolloutBatch) -> MetricSums:
    """Difference sums over the micro-batches whose trainer log-probs this rank holds (the last pipeline
    stage; ``batch.old_logprobs``), counted response tokens only (sequences of weight 0 left out)."""
    sums = MetricSums()
    if not batch.rollout_logprobs:
        return sums
    for mb in batch.micro_batches:
        trained = batch.old_logprobs.get(mb.index)
        if trained is None:
            continue
        valid = mb.response_mask & (mb.weight[:, None] > 0)
        total, peak, count = logprob_diff(rollout_logprobs(batch, mb), trained, valid)
        sums.add("rollout/logprob_diff", total, count)
        if count:
            sums.add_peak("rollout/logprob_diff_max", peak)
    return sums


@dataclass
class LogprobDiffWarning:
    """Warns once per run when ``rollout/logprob_diff_max`` exceeds ``threshold`` (every rank keeps the
    state, since the reduced value is the same everywhere; the rank given ``emit`` logs)."""

    threshold: float
    warned: bool = False

    @classmethod
    def for_dtype(cls, threshold: float | None, dtype_name: str) -> "LogprobDiffWarning":
        """``threshold`` None: the default of the training dtype ("fp32", "bf16" or "fp16")."""
        return cls(threshold=DEFAULT_WARN[dtype_name] if threshold is None else float(threshold))

    def check(self, diff_max: float, diff_mean: float, step: int, emit: bool = True) -> bool:
        """Warn if due (logged when ``emit``); True when it was due now."""
        if self.warned or not diff_max > self.threshold:
            return False
        self.warned = True
        if emit:
            log.warning(
                "step %d: rollout/logprob_diff_max %.3g (mean %.3g) exceeds algorithm.logprob_diff_warn %.3g: the "
                "generator's log-probs differ from the trainer's for the same weights. Likely causes: reduced "
                "precision (bf16/fp16 decode and training forward round differently; raise the threshold if the "
                "mean stays small), a different attention kernel or layer spec in generation and training, or "
                "inputs that differ between the two (M-RoPE positions, vision features, padding mask). Importance "
                "ratios are then off-policy by this much. (Warned once per run.)",
                step, diff_max, diff_mean, self.threshold)
        return True
