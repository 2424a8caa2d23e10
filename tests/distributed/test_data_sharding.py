"""DP sharding on real gloo processes (TP=2 x DP=2): over an epoch every record is read by exactly one
DP rank (none lost, none duplicated), each rank parses only its own shard, TP peers get the same data."""

from __future__ import annotations

import json
import os

import pytest

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _rank_epoch(ckpt: str, root: str, records: str, epochs: int) -> dict:
    from megatron.core import parallel_state

    from megatron_ral.config.data import DataConfig
    from megatron_ral.data.loader import VisionDataLoader
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=3)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    cfg = DataConfig(media_root=root, num_workers=1, fps=2.0, max_failure_fraction=1.0,
                     video_min_pixels=8 * 784, video_max_pixels=16 * 784, image_min_pixels=8 * 784, image_max_pixels=16 * 784)
    loader = VisionDataLoader(cfg, QwenVLProcessor.from_pretrained(ckpt), [records], rank=dp_rank, world_size=dp_size,
                              batch_size=2, num_epochs=epochs)
    seen = [[r.problem_id for r in b.records] for b in loader]
    return {"dp_rank": dp_rank, "dp_size": dp_size, "seen": seen, "metrics": loader.metrics()}


def test_epoch_partition_across_dp_ranks(tmp_path):
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
    from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    root = str(tmp_path / "syn")
    info = make_synthetic_dataset(root, 11, seed=5, spec=SyntheticSpec(heldout_fraction=0.0))
    good = json.load(open(info["train"]))
    path = os.path.join(root, "records.jsonl")
    lines = [json.dumps(r) for r in good] + ['{"problem": "broken"', '{"also": broken}',
                                             json.dumps(dict(good[0], problem_id="gone", path="missing.webm"))]
    open(path, "w").write("\n".join(lines) + "\n")

    results = run_distributed(_rank_epoch, 4, ckpt, root, path, 1, timeout=300)
    by_dp = {}
    for r in results:
        assert r["dp_size"] == 2
        by_dp.setdefault(r["dp_rank"], []).append(r)
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():  # tensor-parallel peers read the same shard in the same order
        assert peers[0]["seen"] == peers[1]["seen"]
        assert peers[0]["metrics"] == peers[1]["metrics"]
    per_rank = {dp: [i for b in peers[0]["seen"] for i in b] for dp, peers in by_dp.items()}
    # One epoch: the good records split between the DP ranks, none twice, none lost.
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(str(r["problem_id"]) for r in good)
    assert abs(by_dp[0][0]["metrics"]["data/samples_total"] - by_dp[1][0]["metrics"]["data/samples_total"]) <= 1
    # Each bad record was parsed by exactly one rank: the ranks read only their own shard.
    m0, m1 = by_dp[0][0]["metrics"], by_dp[1][0]["metrics"]
    assert m0["data/skipped/malformed_record"] + m1["data/skipped/malformed_record"] == 2
    assert m0["data/skipped/missing_file"] + m1["data/skipped/missing_file"] == 1
    assert m0["data/samples_total"] + m1["data/samples_total"] == len(lines)
