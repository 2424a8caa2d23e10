"""A run configured with ``model.hf_path`` alone (no Megatron checkpoint): rank 0 converts the HF directory
into RUN_DIR/initial_mcore while the other ranks wait, the run trains (TP=1 and PP=2), and a second run in
the same directory reuses the conversion and repeats the first run's numbers bit for bit."""

from __future__ import annotations

import json
import math

import pytest

import trainer_fixture as tf
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 2
# PP=2 against TP=1: the tolerances of test_trainer_parallel (float32 sums in another order)
CLOSE = (("loss/policy", 1e-5, 1e-5), ("loss/kl", 1e-5, 1e-9), ("loss/attn", 1e-5, 1e-9),
         ("train/grad_norm", 1e-5, 0.0))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("from_hf")
    return {"root": root, **tf.make_assets(root, "tiny")}


def _run(assets, name: str, world: int, overrides: list[str]) -> list[dict]:
    root = assets["root"]
    cfg = tf.write_config(root / f"{name}.yaml", assets, root / name, model={"load": "", "hf_path": assets["hf"]},
                          training={"train_steps": STEPS}, checkpoint={"save_final": False})
    rows = run_distributed(tf.run_training, world, str(cfg), overrides, timeout=900)[0]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows[-STEPS:]]


def _conversion(assets, name: str):
    out = assets["root"] / name / "initial_mcore"
    meta = (out / ".metadata").stat()
    return out, (meta.st_ino, meta.st_mtime_ns)


def test_training_from_an_hf_directory_tp1_pp2_and_reuse(assets):
    tp1 = _run(assets, "tp1", 1, [])
    out, stamp = _conversion(assets, "tp1")
    assert (out / "config.json").is_file()                       # self-describing, like the converter's output
    assert json.loads((out / ".converted_from.json").read_text())["hf_path"].endswith("hf_tiny")
    assert [r["step"] for r in tp1] == [1, 2] and all(r["train/skipped_updates"] == 0 for r in tp1)
    assert all(math.isfinite(r["loss/policy"]) for r in tp1)

    # PP=2 from the HF directory: rank 0 converts, rank 1 waits; same numbers as TP=1
    pp2 = _run(assets, "pp2", 2, ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layer_split=[2,1]"])
    _conversion(assets, "pp2")
    for a, b in zip(tp1, pp2):
        assert a["reward/total"] == pytest.approx(b["reward/total"], rel=1e-12)
        for k, rel, tol in CLOSE:
            assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=tol), (a["step"], k, a[k], b[k])

    # the same run directory again: the conversion is found and reused (not rewritten), the numbers repeat
    again = _run(assets, "tp1", 1, [])
    assert _conversion(assets, "tp1") == (out, stamp)
    assert again == tp1
