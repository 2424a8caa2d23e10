"""Our GRPO loss against TRL's GRPOTrainer loss on one identical batch (tools/bench/vs_trl.py's loss part).

Runs when TRL (the [bench] extra) is importable and is skipped otherwise, except in an environment set up
with the extra (``MEGATRON_RAL_EXTRAS`` naming bench, as scripts/test.sh and CI do), where a missing TRL
fails; the bench's throughput part is not part of the test suite. Same tiny checkpoint on both sides (Megatron conversion for ours, the HF
directory for TRL), the same two image prompts, three given responses each, advantages, old and
reference log-probs; our loss runs through the trainer's micro-batched schedule (three micro-batches
with the global normaliser), TRL's through GRPOTrainer.compute_loss on the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.platform import destroy, initialize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_ral.bench.vs_trl import make_assets

    return make_assets(tmp_path_factory.mktemp("vs_trl"), preset="tiny", records=4, image_size=64)


@pytest.fixture(scope="module")
def platform():
    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


def _bench_environment() -> bool:
    return "bench" in os.environ.get("MEGATRON_RAL_EXTRAS", "").split(",")


def test_loss_and_gradients_equal_trl_for_every_matching_aggregation(assets, platform, monkeypatch):
    if _bench_environment():
        import trl  # noqa: F401 - set up with the [bench] extra: TRL must be there
    else:
        pytest.importorskip("trl")
    from megatron_ral.bench.trl_parity import LossCase, compare_losses
    from megatron_ral.bench.trl_peer import GRPOSettings

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    s = GRPOSettings(prompts_per_step=2, group_size=3, max_new_tokens=6, temperature=0.7, clip_eps=0.2,
                     kl_beta=0.04)
    case = LossCase(assets.hf_dir, assets.mcore_dir, assets.records_file, assets.media_root, micro_batch_size=2)
    r = compare_losses(case, s)

    assert r["prompt_ids_identical"]
    assert r["pixel_values_max_abs_diff"] < 1e-5
    assert set(r["loss_types"]) == {"grpo", "bnpo", "dapo", "dr_grpo"}
    for name, e in r["loss_types"].items():
        assert e["micro_batches_ours"] == 3
        assert 0.0 < e["clipped_token_frac"] < 1.0, name          # the clip acts on some tokens, not all
        assert abs(e["loss_trl"]) > 1e-3, name                     # a loss worth comparing
        assert e["grad_max_abs"] > 1e-3, name
        assert e["loss_abs_diff"] <= 1e-5, (name, e)
        assert e["grad_max_rel_diff"] <= 1e-5, (name, e)
    # the aggregations really differ, so each pair is a separate check
    losses = {n: e["loss_ours"] for n, e in r["loss_types"].items()}
    assert abs(losses["grpo"] - losses["bnpo"]) > 1e-4 and abs(losses["bnpo"] - losses["dr_grpo"]) > 1e-4
    assert r["goal_met"]


def test_bench_without_trl_prints_one_line_and_exits_2(tmp_path):
    """TRL made unimportable for the child process: the tool names the extra to install."""
    (tmp_path / "trl.py").write_text("raise ImportError('No module named trl')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    done = subprocess.run([sys.executable, str(REPO / "tools/bench/vs_trl.py"), "--skip-throughput"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "TRL is not installed" in lines[0] and ".[bench]" in lines[0], done.stderr
    assert done.stdout == ""
