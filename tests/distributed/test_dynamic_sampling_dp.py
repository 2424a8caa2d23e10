"""Group selection and resharding over 2 real gloo data-parallel ranks (no model): the kept groups, their
content, their positions and the step's counts equal the DP=1 result, groups move between ranks in both
directions, and a rank left without a kept group gets a weight-0 placeholder."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.rl.dynamic_sampling import GroupFilter, draw_groups, round_keys
from megatron_ral.rl.rollout import global_prompt_keys
from megatron_ral.testing.rollouts import synthetic_round
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

P, G = 4, 3


def _zero_variance(name: str):
    return {"every_third": lambda k: k % 3 == 0, "only_key_1": lambda k: k != 1}[name]


def _summary(out) -> dict:
    b = out.batch
    return {"keys": b.prompt_keys, "zero_std": b.zero_std.tolist(),
            "prompts": [p.input_ids.tolist() for p in b.prompts], "pixels": [p.pixel_values.tolist() for p in b.prompts],
            "responses": [[r.tolist() for r in row] for row in b.responses],
            "logprobs": [[r.tolist() for r in row] for row in b.rollout_logprobs],
            "advantages": b.advantages.tolist(), "records": b.records,
            "counts": (out.groups_drawn, out.groups_kept, out.rounds)}


def _run(rank: int, world: int, pattern: str, rounds: int) -> dict:
    zero_variance = _zero_variance(pattern)
    per_rank = P // world

    def generate_round(k):
        return synthetic_round(round_keys(global_prompt_keys(per_rank, rank, world), k, P), G, zero_variance)

    return _summary(draw_groups(GroupFilter(True, rounds), P, generate_round, rank, world, None))


def _rank(pattern: str, rounds: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return _run(dist.get_rank(), dist.get_world_size(), pattern, rounds)
    finally:
        dist.destroy_process_group()


def _rows(summary: dict) -> list[dict]:
    keys = [k for k in summary if k != "counts"]
    return [{k: summary[k][i] for k in keys} for i in range(len(summary["keys"]))]


@pytest.mark.parametrize("pattern, rounds", [("every_third", 4), ("only_key_1", 2)])
def test_dp2_equals_dp1(pattern, rounds):
    ref = _run(0, 1, pattern, rounds)
    got = run_distributed(_rank, 2, pattern, rounds, timeout=300)
    for r, out in enumerate(got):
        assert out["counts"] == ref["counts"]
    kept = [row for row in _rows(ref) if not row["zero_std"]]
    for r, out in enumerate(got):
        rows = [row for row in _rows(out) if not row["zero_std"]]
        assert rows == kept[r::2], f"rank {r}"      # rank r trains on kept groups r, r + 2, ...
    if pattern == "every_third":
        # kept draw keys 1, 2, 4, 5: key 1 (drawn by rank 1) trains on rank 0 and key 2 (rank 0) on rank 1
        assert [p[0] - 1000 for p in ref["prompts"]] == [1, 2, 4, 5]
        assert [got[0]["prompts"][0][0], got[1]["prompts"][0][0]] == [1001, 1002]
    else:
        # one kept group for two ranks: rank 1 runs a placeholder of its own (key outside [0, P), A = 0)
        assert got[0]["keys"] == [0] and got[0]["prompts"][0][0] == 1001
        assert got[1]["keys"] == [P] and got[1]["zero_std"] == [True] and not torch.tensor(got[1]["advantages"]).any()
