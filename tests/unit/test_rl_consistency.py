"""The rollout/trainer log-prob comparison by hand: alignment of the generator's log-probs with a micro-batch's
token rows, the sum / max / count over counted tokens only, the peak's reduction, and the warning's once rule."""

import logging

import torch

from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.batch import RolloutBatch, plan_micro_batches
from megatron_ral.rl.consistency import LogprobDiffWarning, consistency_sums, logprob_diff, rollout_logprobs
from megatron_ral.rl.metrics import MetricSums


def _batch(zero_std=(False, False)) -> RolloutBatch:
    prompts = [PromptInput(torch.arange(3)), PromptInput(torch.arange(5))]
    lengths = ((2, 1), (3, 2))
    responses = [[torch.arange(n) + 100 for n in row] for row in lengths]
    logps = [[-torch.arange(1, n + 1, dtype=torch.float32) * (p + 1) for n in row] for p, row in enumerate(lengths)]
    z = torch.zeros(2, 2)
    return RolloutBatch(prompts=prompts, records=[None, None], prompt_keys=[0, 1], responses=responses,
                        texts=[["", ""]] * 2, finish_reasons=[["stop"] * 2] * 2, rewards=z, accuracy=z, format=z,
                        advantages=torch.ones(2, 2), zero_std=torch.tensor(zero_std), rollout_logprobs=logps)


def test_logprob_diff_by_hand():
    gen = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    trained = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, 7.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert logprob_diff(gen, trained, valid) == (0.75, 0.5, 3.0)
    assert logprob_diff(gen, trained, torch.zeros_like(valid)) == (0.0, 0.0, 0.0)


def test_rows_align_and_only_counted_tokens_enter():
    batch = _batch(zero_std=(True, False))
    batch.micro_batches = plan_micro_batches(batch, 1, 4, 0, drop_zero_std_groups=True)
    (mb,) = batch.micro_batches
    assert [(r.prompt, r.sample) for r in mb.refs] == [(1, 0), (1, 1)]
    torch.testing.assert_close(rollout_logprobs(batch, mb), torch.tensor([[-2.0, -4.0, -6.0], [-2.0, -4.0, 0.0]]))
    # trainer log-probs off by 0.1 on token (0, 2) and by 1.0 beyond the second response's end (not a token)
    trained = torch.tensor([[-2.0, -4.0, -6.1], [-2.0, -4.0, 1.0]])
    batch.old_logprobs[mb.index] = trained
    sums = consistency_sums(batch)
    assert abs(sums.total("rollout/logprob_diff") - 0.1) < 1e-6 and sums.counts["rollout/logprob_diff"] == 5
    assert abs(sums.peak("rollout/logprob_diff_max") - 0.1) < 1e-6
    # micro-batches without trainer log-probs (another pipeline stage) contribute nothing
    batch.old_logprobs.clear()
    assert "rollout/logprob_diff" not in consistency_sums(batch)


def test_peaks_merge_by_maximum():
    a, b = MetricSums(), MetricSums()
    a.add_peak("x", 0.25)
    a.add_peak("x", 0.125)
    b.add_peak("x", 0.5)
    a.merge(b)
    assert a.peak("x") == 0.5 and a.all_reduce().peak("x") == 0.5 and a.peak("missing") == 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_warning_fires_once_above_the_threshold():
    w = LogprobDiffWarning.for_dtype(None, "fp32")
    assert w.threshold == 1e-3 and LogprobDiffWarning.for_dtype(None, "bf16").threshold > w.threshold
    logger, handler = logging.getLogger("megatron_ral.train"), _Records()
    logger.addHandler(handler)
    try:
        assert not w.check(1e-3, 1e-4, 1)            # at the threshold: quiet
        assert w.check(2e-3, 1e-4, 2)
        assert not w.check(5e-1, 1e-1, 3)            # once per run
    finally:
        logger.removeHandler(handler)
    assert len(handler.messages) == 1 and "step 2" in handler.messages[0], handler.messages
    assert "logprob_diff_warn" in handler.messages[0]
    quiet = LogprobDiffWarning(threshold=1e-6)
    assert quiet.check(1.0, 1.0, 1, emit=False) and quiet.warned
