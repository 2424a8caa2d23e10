"""The data-failure stop rule of a training run counts every data-parallel rank: unreadable media on one
rank's shard alone do not stop the run while the share over all shards stays under
data.max_failure_fraction, and stop every rank at the same step once it is over."""

from __future__ import annotations

import json

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    a = tf.make_assets(root, "tiny")
    records = json.loads((root / "data" / "train.json").read_text())[:16]
    for i in (1, 3):  # positions 1 and 3: rank 1's shard of a DP=2 run (no shuffle), its first two draws
        records[i]["path"] = f"videos/missing_{i}.webm"
    (root / "broken.json").write_text(json.dumps(records))
    return {"root": root, **a}


def _run(assets, name: str, fraction: float):
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets, root / name,
                          data={"train_files": [str(root / "broken.json")], "max_failure_fraction": fraction,
                                "failure_window": 8},
                          training={"train_steps": 1}, algorithm={"name": "grpo", "kl_beta": 0.0})
    return run_distributed(tf.run_training, 2, str(cfg), [], timeout=600)


def test_failures_are_counted_over_every_rank(assets):
    # rank 1 alone: 2 failures of its last 8 draws = 25% > 20%; over both ranks 2 / 16 = 12.5%: the run goes on
    rows = _run(assets, "under", 0.2)[0]
    assert [r["step"] for r in rows] == [1] and rows[0]["data/skipped"] == 2
    # over 10%: every rank stops at the same step with the same one-line error
    with pytest.raises(RuntimeError, match=r"2 of the last 16 samples failed \(12.5% > data.max_failure_fraction=10.0%\)"):
        _run(assets, "over", 0.1)
