"""The capture benchmark runs end to end on a tiny grid and reports what it promises (no timing asserts)."""

from __future__ import annotations

import json

from megatron_ral.bench.attention_capture import run_benchmark
from megatron_ral.attention.old_policy import stored_values_per_sample


def test_tiny_benchmark_report():
    res = run_benchmark([256], [64], heads=4, kv_heads=2, head_dim=8, repeats=1, eager_cap_gib=8.0)
    json.dumps(res)  # serialisable
    assert res["layout"]["head_dim"] == 8 and "scaled down" in res["layout"]["width_note"]
    (case,) = res["cases"]
    for impl in ("capture", "eager"):
        assert case[impl]["status"] == "ok", case[impl]
        # tiny shapes may fit in memory the process already holds: the high-water mark can stay put
        assert case[impl]["peak_extra_bytes"] >= 0 and case[impl]["fwd_bwd_cpu_s"] > 0
    assert "memory_ratio_capture_over_eager" in case and "time_ratio_capture_over_eager" in case
    storage = {(e["T"], e["R"]): e for e in res["old_policy_storage"]}
    e = storage[(32768, 4096)]
    assert e["rows_bf16_bytes"] == 2 * stored_values_per_sample("rows", 4096, 32768, 4, 2, 128)
    assert e["qk_bf16_tp1_bytes"] == 2 * stored_values_per_sample("qk", 4096, 32768, 4, 2, 128)
    assert res["old_policy_exactness"]["qk_grad_norm_at_old_weights"] == 0.0


def test_eager_skipped_above_cap():
    res = run_benchmark([512], [128], heads=4, kv_heads=2, head_dim=8, repeats=1, eager_cap_gib=1e-4)
    (case,) = res["cases"]
    assert case["eager"]["status"] == "skipped" and "did not fit" in case["eager"]["reason"]
    assert case["capture"]["status"] == "ok"
