"""Group selection and dynamic sampling by hand (one process): zero-variance groups are dropped, exactly those;
refill rounds run until the step holds prompts_per_step informative groups and never beyond
max_sampling_rounds; the kept groups keep their content and get their position as key; the settings map onto
one mechanism (drop_zero_std_groups = no refill)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_ral.rl.batch import plan_micro_batches
from megatron_ral.rl.dynamic_sampling import DrawnGroup, GroupFilter, draw_groups, round_keys, select_groups
from megatron_ral.rl.rollout import global_prompt_keys
from megatron_ral.testing.rollouts import group_content, synthetic_round

P, G = 4, 4


def every_third(key: int) -> bool:
    return key % 3 == 0


def _draw(plan, zero_variance, target=P):
    calls = []

    def generate_round(k):
        calls.append(k)
        return synthetic_round(round_keys(global_prompt_keys(P, 0, 1), k, P), G, zero_variance)

    return draw_groups(plan, target, generate_round, 0, 1), calls


def _drawn_keys(out):
    """The draw key of each kept group, read back from its content (prompt token 1000 + key)."""
    return [int(p.input_ids[0]) - 1000 for p in out.batch.prompts]


def test_settings_are_one_mechanism():
    alg = SimpleNamespace(dynamic_sampling=False, drop_zero_std_groups=False, max_sampling_rounds=5)
    assert GroupFilter.from_config(alg) == GroupFilter(False, 1)
    alg.drop_zero_std_groups = True
    assert GroupFilter.from_config(alg) == GroupFilter(True, 1)          # drop without refill
    alg.dynamic_sampling = True
    assert GroupFilter.from_config(alg) == GroupFilter(True, 5)          # drop and refill
    alg.drop_zero_std_groups = False
    assert GroupFilter.from_config(alg) == GroupFilter(True, 5)          # dynamic sampling implies dropping


def test_select_by_hand():
    drawn = [DrawnGroup(k, k % 2, z) for k, z in [(5, False), (0, True), (3, False), (1, False), (2, True)]]
    assert [d.key for d in select_groups(drawn, 2, True)] == [1, 3]
    assert [d.key for d in select_groups(drawn, 10, True)] == [1, 3, 5]
    assert [d.key for d in select_groups(drawn, 3, False)] == [0, 1, 2]
    assert round_keys([0, 2], 3, 4) == [12, 14]


def test_refill_drops_exactly_the_zero_variance_groups():
    out, calls = _draw(GroupFilter(True, 4), every_third)
    # round 0: keys 0..3, zero variance 0 and 3; round 1: keys 4..7, zero variance 6 -> 5 informative >= 4
    assert calls == [0, 1] and out.rounds == 2
    assert _drawn_keys(out) == [1, 2, 4, 5]                              # 7 is informative but surplus
    assert (out.groups_drawn, out.groups_kept, out.groups_dropped) == (8, 4, 4)
    b = out.batch
    assert b.prompt_keys == [0, 1, 2, 3] and not b.zero_std.any()
    for i, key in enumerate(_drawn_keys(out)):                          # the content travelled with the group
        c = group_content(key, G)
        assert torch.equal(b.prompts[i].input_ids, c["prompt"]) and torch.equal(b.prompts[i].pixel_values, c["pixels"])
        assert all(torch.equal(x, y) for x, y in zip(b.responses[i], c["responses"]))
        assert all(torch.equal(x, y) for x, y in zip(b.rollout_logprobs[i], c["logprobs"]))
        assert b.records[i] == {"key": key} and b.texts[i][1] == f"{key}/1"
    ref = synthetic_round([1, 2, 4, 5], G, every_third)
    assert torch.equal(b.advantages, ref.advantages) and torch.equal(b.rewards, ref.rewards)
    # every kept sequence enters the update
    mbs = plan_micro_batches(b, 2, 16, 0, drop_zero_std_groups=True)
    assert sum(m.num_sequences for m in mbs) == 4 * G


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_the_bound_on_rounds_holds(rounds):
    out, calls = _draw(GroupFilter(True, rounds), lambda k: k != 5)    # one informative group, key 5 (round 1)
    assert calls == list(range(rounds)) and out.rounds == rounds
    assert out.groups_drawn == P * rounds
    assert _drawn_keys(out) == ([5] if rounds >= 2 else [0])            # round 0 alone: only the placeholder
    if rounds == 1:                                                      # nothing kept: a weight-0 placeholder
        assert out.groups_kept == 0 and out.batch.zero_std.tolist() == [True]
        assert out.batch.prompt_keys == [P] and not out.batch.advantages.any()
        mbs = plan_micro_batches(out.batch, 2, 16, 0, drop_zero_std_groups=True)
        assert all(m.num_sequences == 0 for m in mbs)
    else:
        assert out.groups_kept == 1 and out.groups_dropped == P * rounds - 1


def test_drop_only_and_off():
    out, calls = _draw(GroupFilter(True, 1), every_third)
    assert calls == [0] and _drawn_keys(out) == [1, 2] and (out.groups_drawn, out.groups_dropped) == (4, 2)
    out, calls = _draw(GroupFilter(False, 1), every_third)
    assert calls == [0] and _drawn_keys(out) == [0, 1, 2, 3] and out.groups_dropped == 0
    assert out.batch.zero_std.tolist() == [True, False, False, True]    # kept, counted, A = 0
