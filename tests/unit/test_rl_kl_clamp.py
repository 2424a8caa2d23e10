"""algorithm.kl_clamp reaches the KL term of the update loss: the loss/kl of a micro-batch with one far
token equals the hand-aggregated clamped k3, and stays finite where the unbounded term overflows."""

import math

import pytest
import torch

from megatron_ral.config import load_config
from megatron_ral.config.schema import GenerationConfig
from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.batch import RolloutBatch, plan_micro_batches
from megatron_ral.rl.update import LossSettings, minibatch_loss


def _micro_batch():
    prompts = [PromptInput(torch.arange(3, 6))]
    responses = [[torch.arange(10, 13), torch.arange(20, 22)]]     # 3 + 2 response tokens
    z = torch.zeros(1, 2)
    batch = RolloutBatch(prompts=prompts, records=[None], prompt_keys=[0], responses=responses,
                         texts=[["", ""]], finish_reasons=[["stop", "stop"]], rewards=z, accuracy=z, format=z,
                         advantages=torch.tensor([[1.0, -1.0]]), zero_std=torch.tensor([False]))
    return plan_micro_batches(batch, 1, 2, pad_token_id=0)[0]


@pytest.mark.parametrize("clamp", [None, 20.0])
def test_kl_clamp_in_the_update_loss(clamp):
    overrides = [] if clamp is None else [f"algorithm.kl_clamp={clamp}"]
    s = LossSettings.from_config(load_config(None, overrides).algorithm, GenerationConfig(), use_attention=False)
    assert s.kl_clamp == clamp
    mb = _micro_batch()
    logp = torch.tensor([[-1.0, -2.0, -120.0], [-0.5, -1.5, 0.0]])    # row 1's third entry is padding
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, 0.0]])         # d = ref - logp = [[-0.5, 0, 120], [0, 0.5, .]]
    _, metrics = minibatch_loss(mb, logp, logp.detach(), ref, None, None, {"tokens": 5.0, "sequences": 2.0}, s)
    if clamp is None:
        assert math.isinf(metrics["loss/kl"])
        return
    k3 = lambda d: math.exp(d) - d - 1.0  # noqa: E731
    want = (k3(-0.5) + k3(0.0) + k3(20.0) + k3(0.0) + k3(0.5)) / 5.0   # token_mean over the 5 response tokens
    assert metrics["loss/kl"] == pytest.approx(want, rel=1e-6)
