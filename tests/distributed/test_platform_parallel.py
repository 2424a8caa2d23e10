"""Real megatron-core on gloo: TP=2, PP=2 (1F1B) and TP2xPP2 give the loss and gradients of TP=1/PP=1,
and a distributed checkpoint saved at one layout loads at another with identical outputs."""

from __future__ import annotations


import pytest
import torch

import gpt_fixture as fx
from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _reference(ckpt: str, grads: str) -> dict:
    """TP=1/PP=1: build, save the initial weights, one forward/backward, save the gradients."""
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(), seed=7)
    torch.manual_seed(7)
    model = fx.build_model()
    fx.save(model, ckpt)
    data = fx.batches()
    loss = fx.forward_backward(model, data)
    fx.grads_into_params(model)
    fx.save(model, grads)
    return {"loss": loss}


def _parallel(tp: int, pp: int, ckpt: str, grads_out: str, stepped_out: str, split) -> dict:
    """Load the reference weights at TP/PP, forward/backward through the schedule, save grads and an SGD step."""
    from megatron.core import parallel_state

    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=11)
    model = fx.build_model(split)
    fx.load(model, ckpt)
    data = fx.batches()
    loss = fx.forward_backward(model, data)
    fx.sgd_step(model)
    fx.save(model, stepped_out)
    stepped_logits = fx.logits(model, fx.batches(seed=1))
    fx.grads_into_params(model)  # after the step's logits: gradients are still the reference ones
    fx.save(model, grads_out)
    last = parallel_state.is_pipeline_last_stage()
    return {"loss": loss if last else None, "logits": stepped_logits if last else None}


def _load_and_logits(tp: int, pp: int, path: str) -> torch.Tensor | None:
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=3)
    model = fx.build_model()
    fx.load(model, path)
    return fx.logits(model, fx.batches(seed=1))


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _load_state(path: str) -> dict:
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(), seed=0)
    model = fx.build_model()
    fx.load(model, path)
    return _state(model)


def _verify_single(grads: str, stepped: str) -> dict:
    """TP=1/PP=1: the gradients checkpoint as global tensors, and the logits of the stepped checkpoint."""
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(), seed=0)
    model = fx.build_model()
    fx.load(model, grads)
    out = {"grads": _state(model)}
    fx.load(model, stepped)
    out["logits"] = fx.logits(model, fx.batches(seed=1))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (out,) = run_distributed(_reference, 1, ckpt, grads)
    return {"ckpt": ckpt, "loss": out["loss"], "grads": run_distributed(_load_state, 1, grads)[0]}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("tp,pp,split", [(2, 1, None), (1, 2, [1, 3]), (2, 2, None)],
                         ids=["tp2", "pp2-uneven", "tp2pp2"])
def test_parallel_layout_matches_single_process(reference, tmp_path, tp, pp, split):
    grads_path, stepped = str(tmp_path / "grads"), str(tmp_path / "stepped")
    outs = run_distributed(_parallel, tp * pp, tp, pp, reference["ckpt"], grads_path, stepped, split)
    losses = [o["loss"] for o in outs if o["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert abs(loss - reference["loss"]) <= 1e-5 * abs(reference["loss"])

    # Gradients, gathered into the global layout by the dist checkpoint, equal TP=1/PP=1's.
    (single,) = run_distributed(_verify_single, 1, grads_path, stepped)
    grads = single["grads"]
    assert grads.keys() == reference["grads"].keys()
    for k, ref in reference["grads"].items():
        assert _max_rel(grads[k], ref) <= 1e-5, k

    # The checkpoint written at this layout after one SGD step loads at TP=1 and at PP=2 with the same logits.
    expected = next(o["logits"] for o in outs if o["logits"] is not None)
    torch.testing.assert_close(single["logits"], expected, rtol=1e-5, atol=1e-5)
    if (tp, pp) == (2, 1):
        pp2 = [x for x in run_distributed(_load_and_logits, 2, 1, 2, stepped) if x is not None]
        torch.testing.assert_close(pp2[0], expected, rtol=1e-5, atol=1e-5)
