"""The reference weights swapped into the model (algorithm.reference_placement device / host).

1. The host swap's order of operations under asynchronous transfers. On a GPU a copy from pinned host
   memory reads its source after ``copy_`` returns; here a transfer engine that performs every copy only
   at ``wait`` (reading the source then) stands in for it. The swap must still put the reference in and
   the policy back bit for bit: a swap that rewrote the host copy before waiting would leave the policy
   in the model during the "reference" pass and lose the reference.
2. The real model: after a reference pass (rl.passes.reference_pass) the policy is bit-identical, and the
   reference log-probs equal those of a second model loaded from the reference checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from rollout_fixture import tiny_rollouts

from megatron_ral.rl.reference import ReferenceWeights, Transfers


class DeferredTransfers(Transfers):
    """Copies happen at ``wait``, in issue order, reading their sources then (a late DMA)."""

    def __init__(self):
        self.pending = []
        self.waits = 0

    def copy(self, dst, src):
        self.pending.append((dst, src))

    def wait(self, device):
        for dst, src in self.pending:
            dst.copy_(src)
        self.pending.clear()
        self.waits += 1


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3, bias=False))
    m[0].bias.requires_grad_(False)  # frozen: not part of the reference
    return m


def _state(m) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("staging_bytes", [1 << 20, 24])  # one piece per parameter / several pieces
def test_host_swap_is_exact_under_late_transfers(staging_bytes):
    model = _module(0)
    reference = _state(model)
    engine = DeferredTransfers()
    ref = ReferenceWeights([model], "host", transfers=engine, staging_bytes=staging_bytes)
    with torch.no_grad():                     # training moves the trainable weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    policy = _state(model)
    for _ in range(2):                        # two reference passes in a row
        with ref.active():
            assert not engine.pending
            for k, v in model.state_dict().items():
                assert torch.equal(v, reference[k] if k != "0.bias" else policy[k]), k
        assert not engine.pending
        for k, v in model.state_dict().items():
            assert torch.equal(v, policy[k]), k
    pieces = sum(-(-p.numel() * 4 // staging_bytes) for p in model.parameters() if p.requires_grad)
    assert engine.waits == 4 * pieces                     # 2 passes x (in + out), one wait per piece


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.testing.inference import converted_checkpoint
    from megatron_ral.platform import destroy, initialize

    initialize(ParallelConfig(), seed=1234)
    yield converted_checkpoint(tmp_path_factory.mktemp("reference"), "tiny", seed=4)
    destroy()


def _batch():
    return tiny_rollouts(("image", "video"), (4, 6), [[0.0, 0.0], [0.0, 0.0]], minibatches=1, micro_batch_size=2)


def _weights(model) -> dict:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _context(model):
    from megatron_ral.rl.schedule import PassContext
    from megatron_ral.rl.vision import encode_prompts_vision

    return PassContext(model=[model], vision=encode_prompts_vision(model, _batch().prompts))


@pytest.mark.parametrize("placement", ["host", "device"])
def test_reference_pass_restores_the_policy_and_matches_the_reference_model(ckpt, placement):
    from megatron_ral.inference.loading import load_model
    from megatron_ral.rl.passes import old_pass, reference_pass

    _, mc = ckpt
    model = load_model(mc, dtype=torch.float32, backend="local")
    ref = ReferenceWeights([model], placement, staging_bytes=4096)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.05).add_(1e-3)       # the policy after some training
    policy = _weights(model)

    batch = _batch()
    reference_pass(_context(model), batch, ref)
    for k, v in _weights(model).items():
        assert torch.equal(v, policy[k]), k

    expected = _batch()                        # the reference checkpoint's own model, as an old pass
    other = load_model(mc, dtype=torch.float32, backend="local")
    old_pass(_context(other), expected, None, other.image_token_id, other.video_token_id)
    for i, got in batch.ref_logprobs.items():
        assert torch.equal(got, expected.old_logprobs[i])
    policy_pass = _batch()                     # and the policy's differ: the swap did something
    old_pass(_context(model), policy_pass, None, model.image_token_id, model.video_token_id)
    assert not torch.equal(policy_pass.old_logprobs[0], expected.old_logprobs[0])
