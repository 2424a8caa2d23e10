"""The attention capture under context parallelism equals the unsplit capture (CP=2 on two gloo ranks against
CP=1), on the Qwen25VLModel itself: a right-padded micro-batch of a video prompt and an image prompt with
their responses, both of odd length (padded to a multiple of 2C by the model).

- the rows p_theta (each CP rank computes an even share of the response rows from the Q rows shared by the
  rank holding each token, against the whole all-gathered key sequence; put back together) equal the CP=1
  rows, and both ranks compute rows although one rank holds most of the response;
- p_old kept by the "qk" store gives, at theta = theta_old, a RAL loss whose gradient is exactly zero for
  every parameter on every rank (the first update after a rollout);
- after a change of the weights, the RAL loss A * JSD(p_theta || p_old) per token (summed over the CP group)
  and its gradient (each rank's share summed over the group) equal CP=1's.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.models import make_prompt
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

PLENS, RLENS = [15, 12], [8, 7]
ADV = torch.tensor([1.0, -0.5])


def _batch():
    prompt = make_prompt([[3, ("video", (2, 4, 4)), 10], [5, ("image", (1, 4, 4)), 8]], seed=41,
                         second_per_grid_ts=[0.5], padding_side="right")
    ids = prompt.input_ids
    assert [p + r for p, r in zip(PLENS, RLENS)] == prompt.attention_mask.sum(1).tolist() == [23, 19]
    r = max(RLENS)
    inputs = prompt.model_inputs()
    inputs["labels"] = torch.roll(ids, -1, dims=1)
    inputs["loss_index"] = (torch.tensor(PLENS)[:, None] - 1 + torch.arange(r)[None]).clamp(max=ids.shape[1] - 1)
    return inputs


def _worker(cp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ral.attention.capture import AttentionCapture, response_layout
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.platform import initialize
    from megatron_ral.rl import losses as L
    from megatron_ral.testing.models import seeded_megatron_model

    parallel = ParallelConfig(context_parallel_size=cp)
    initialize(parallel, seed=3)
    group = ps.get_context_parallel_group() if cp > 1 else None
    model = seeded_megatron_model("tiny", seed=9, parallel=parallel, vision_attn_implementation="eager")
    model.train()
    inputs = _batch()
    layout = response_layout(PLENS, RLENS, padding_mask=inputs["attention_mask"].bool())
    capture = AttentionCapture(model)
    store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    out = {}

    # old pass: p_old kept as Q rows + K
    with torch.no_grad(), capture.capture(layout, grad=False, keep_qk=True) as res:
        model(**inputs)
    store.put(0, res.qk)
    out["computed_rows"] = int(res.rows.shape[1]) if res.cp is None else int(res.cp.valid.sum())
    rows = res.rows if res.cp is None else res.cp.full_rows(res.rows)
    out["rows"] = rows[..., : inputs["input_ids"].shape[1]].clone()
    out["tail_mass"] = float(rows[..., inputs["input_ids"].shape[1]:].abs().sum())

    def ral_loss():
        with capture.capture(layout, grad=True) as r:
            token_loss = model(**inputs)
        p_old = store.get(0)
        per_token = r.per_row(L.attention_loss(r.rows, p_old, ADV, "jsd"))
        return per_token, token_loss

    def grads():
        g = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                t = p.grad.detach().clone()
                if group is not None:
                    dist.all_reduce(t, group=group)
                g[n] = t
        return g

    # first update: theta = theta_old, the RAL term's gradient is exactly zero
    model.zero_grad()
    per_token, _ = ral_loss()
    per_token.sum().backward()
    out["first_grad_max"] = max(float(g.abs().max()) for g in grads().values())
    out["first_loss"] = float(per_token.abs().max())

    # after a change of the weights
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.zero_grad()
    per_token, _ = ral_loss()
    per_token.sum().backward()
    out["loss"] = per_token.detach()
    out["grads"] = grads()
    return out


def test_capture_and_ral_gradient_at_cp2_equal_cp1():
    ref = run_distributed(_worker, 1, 1)[0]
    outs = run_distributed(_worker, 2, 2)
    rows_ref = ref["rows"]
    assert rows_ref.shape == (2, max(RLENS), 23)
    for b, (p, r) in enumerate(zip(PLENS, RLENS)):  # every response row is a distribution over earlier keys
        torch.testing.assert_close(rows_ref[b, :r].sum(-1), torch.ones(r, dtype=rows_ref.dtype))
    assert ref["first_grad_max"] == 0.0
    assert float(ref["loss"].abs().max()) > 1e-6  # the weights moved: the term is not trivially zero
    assert sorted(o["computed_rows"] for o in outs) == [7, 8]  # 15 response rows dealt out over 2 ranks
    for o in outs:
        assert o["tail_mass"] == 0.0
        torch.testing.assert_close(o["rows"], rows_ref, rtol=1e-5, atol=1e-6)
        assert o["first_grad_max"] == 0.0 and o["first_loss"] == 0.0
        torch.testing.assert_close(o["loss"], ref["loss"], rtol=1e-5, atol=1e-8)
        assert set(o["grads"]) == set(ref["grads"])
        checked = 0
        for n, g in ref["grads"].items():
            scale = float(g.abs().max())
            if scale == 0.0:
                assert float(o["grads"][n].abs().max()) == 0.0, n
                continue
            err = float((o["grads"][n] - g).abs().max()) / scale
            assert err <= 1e-4, (n, err)
            checked += 1
        assert checked >= 10
