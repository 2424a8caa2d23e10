"""The CPU compatibility layer: inactive with CUDA present, effective and reversible without it."""

import sys

import megatron.core.pipeline_parallel.schedules as schedules
import megatron.core.tensor_parallel.random as mrandom
import pytest
import torch

from megatron_ral.platform import cpu_compat


@pytest.fixture
def clean():
    cpu_compat.uninstall()
    yield
    cpu_compat.uninstall()


def test_noop_when_cuda_is_available(monkeypatch, clean):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.Tensor.cuda, torch.Tensor.type, schedules.torch, mrandom._get_cuda_rng_state, list(sys.meta_path))
    assert cpu_compat.install() is False
    assert not cpu_compat.is_installed()
    after = (torch.Tensor.cuda, torch.Tensor.type, schedules.torch, mrandom._get_cuda_rng_state, list(sys.meta_path))
    assert before == after


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_megatron_modules_see_cpu_devices(clean):
    assert cpu_compat.install() is True
    assert schedules.torch is not torch
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    # Not a megatron module: torch unchanged.
    assert torch.zeros(1).device.type == "cpu"
    # type() lies only to megatron-core callers.
    assert torch.zeros(2).type() == "torch.FloatTensor"
    cpu_compat.uninstall()
    assert schedules.torch is torch
    assert torch.Tensor.cuda is not cpu_compat._tensor_cuda_on_cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_rng_tracker_forks_a_real_stream(clean):
    cpu_compat.install()
    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel", 1234)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel"):
        a = torch.rand(4)
    # The default stream is restored...
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("model-parallel"):
        b = torch.rand(4)
    # ...and the forked stream continues where it left off, seeded by 1234.
    g = torch.Generator().manual_seed(1234)
    ref = torch.rand(8, generator=g)
    assert torch.equal(torch.cat([a, b]), ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_pinned_factories_work_without_a_driver(clean):
    """megatron's per-CP-rank slicing of a rotary table builds a pin_memory=True CPU tensor."""
    import types

    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    cpu_compat.install()
    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 1)
    emb = torch.arange(8.0).view(8, 1, 1, 1)
    # chunks 1 and 2C-1-1 = 2 of four
    assert rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, group).flatten().tolist() == [2.0, 3.0, 4.0, 5.0]
    cpu_compat.uninstall()
    with pytest.raises(RuntimeError):  # the test means something: torch itself refuses without a driver
        rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, group)
