"""The trainer's bookkeeping by hand: micro-batch planning (prompt-major order, mini-batch split, padding,
labels, the response-aligned gather index and layout), layout-free prompt keys, loader positions when the
data-parallel size changes, chance accuracy and the reward-curve quarters."""

import torch

from megatron_ral.inference.prompts import PromptInput
from megatron_ral.rl.batch import RolloutBatch, micro_batch_vision, plan_micro_batches
from megatron_ral.rl.evaluate import chance_accuracy
from megatron_ral.rl.rollout import global_prompt_keys
from megatron_ral.cli.summary import quarter_means
from megatron_ral.rl.trainer import loader_state_for

PAD = 0


def _batch(prompt_lengths=(3, 5), response_lengths=((2, 1), (3, 2)), zero_std=(False, False)) -> RolloutBatch:
    prompts = [PromptInput(torch.arange(10 * (p + 1), 10 * (p + 1) + n)) for p, n in enumerate(prompt_lengths)]
    responses = [[torch.arange(100 + 10 * g, 100 + 10 * g + n) for g, n in enumerate(row)] for row in response_lengths]
    shape = (len(prompts), len(response_lengths[0]))
    adv = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    z = torch.zeros(shape)
    return RolloutBatch(prompts=prompts, records=[None] * len(prompts), prompt_keys=list(range(len(prompts))),
                        responses=responses, texts=[[""] * shape[1]] * shape[0], finish_reasons=[["stop"] * shape[1]] * shape[0],
                        rewards=z, accuracy=z, format=z, advantages=adv, zero_std=torch.tensor(zero_std))


def test_micro_batches_by_hand():
    batch = _batch()
    mbs = plan_micro_batches(batch, num_minibatches=2, micro_batch_size=1, pad_token_id=PAD)
    # 4 sequences prompt-major -> mini-batch 0: (p0,g0),(p0,g1); mini-batch 1: (p1,g0),(p1,g1); one per micro-batch
    assert [(m.minibatch, [(r.prompt, r.sample) for r in m.refs]) for m in mbs] == [
        (0, [(0, 0)]), (0, [(0, 1)]), (1, [(1, 0)]), (1, [(1, 1)])]
    assert [m.index for m in mbs] == [0, 1, 2, 3]
    m = plan_micro_batches(batch, 1, 4, PAD)[0]
    # sequence (p1, g0): prompt 20..24 then response 100..102, padded to 8 = 5 + 3
    assert m.input_ids[2].tolist() == [20, 21, 22, 23, 24, 100, 101, 102]
    assert m.input_ids[1].tolist() == [10, 11, 12, 110, PAD, PAD, PAD, PAD]
    assert m.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert m.labels[2].tolist()[:7] == [21, 22, 23, 24, 100, 101, 102]
    # response token r of sequence b is predicted at position P_b - 1 + r
    assert m.gather_index[2].tolist() == [4, 5, 6] and m.gather_index[0].tolist() == [2, 3, 4]
    assert m.response_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True], [True, True, False]]
    assert m.layout.row_index[2].tolist() == [5, 6, 7] and m.num_tokens == 8 and m.num_sequences == 4
    assert m.advantages.tolist() == [0.0, 1.0, 2.0, 3.0]
    # labels at the gather positions are the response tokens themselves
    assert m.labels.gather(1, m.gather_index)[2].tolist() == [100, 101, 102]


def test_dropped_groups_and_empty_minibatches_keep_a_zero_weight_sequence():
    batch = _batch(zero_std=(True, True))
    mbs = plan_micro_batches(batch, 2, 4, PAD, drop_zero_std_groups=True)
    assert len(mbs) == 2 and all(m.num_sequences == 0 and m.size == 1 for m in mbs)
    kept = plan_micro_batches(_batch(zero_std=(True, False)), 1, 4, PAD, drop_zero_std_groups=True)
    assert [(r.prompt, r.sample) for r in kept[0].refs] == [(1, 0), (1, 1)]


def test_micro_batch_vision_concatenates_rows_in_order():
    from megatron_ral.models.qwen25vl.vision import VisionEmbeddings

    batch = _batch()
    per_prompt = [VisionEmbeddings(image=torch.ones(2, 4)), VisionEmbeddings(video=torch.full((3, 4), 2.0))]
    m = plan_micro_batches(batch, 1, 4, PAD)[0]
    v = micro_batch_vision(m, per_prompt)
    assert v.image.shape == (4, 4) and v.video.shape == (6, 4)
    assert micro_batch_vision(m, [None, None]) is None


def test_prompt_keys_are_the_global_positions_of_the_loader_shards():
    # rank r of W reads global positions r, r + W, ... (data.sharding.shard): DP=2 x 2 prompts = DP=1 x 4 prompts
    assert global_prompt_keys(4, 0, 1) == [0, 1, 2, 3]
    assert sorted(global_prompt_keys(2, 0, 2) + global_prompt_keys(2, 1, 2)) == [0, 1, 2, 3]


def test_loader_positions_when_the_data_parallel_size_changes():
    states = [{"epoch": 1, "position": 10}, {"epoch": 1, "position": 9}]
    assert loader_state_for(states, 1, 2) == states[1]
    # consumed by every rank: min(10 * 2 + 0, 9 * 2 + 1) = 19 global records of epoch 1
    assert loader_state_for(states, 0, 1) == {"epoch": 1, "position": 19}
    assert [loader_state_for(states, r, 4)["position"] for r in range(4)] == [5, 5, 5, 4]  # ceil((19 - r) / 4)
    # a rank already in the next epoch does not move the others past what they have not read
    assert loader_state_for([{"epoch": 2, "position": 0}, {"epoch": 1, "position": 30}], 0, 1) == {"epoch": 1, "position": 61}


def test_chance_accuracy_and_quarters():
    train = [{"problem_type": "numerical", "data_source": "count", "solution": f"<answer>{k}</answer>"} for k in (1, 2, 3, 2)]
    heldout = [{"problem_type": "multiple choice", "options": ["A. x", "B. y", "C. z", "D. w"], "solution": "<answer>A</answer>"},
               {"problem_type": "numerical", "data_source": "count", "solution": "<answer>2</answer>"}]
    assert chance_accuracy(heldout, train) == (0.25 + 1 / 3) / 2
    assert quarter_means([1, 2, 3, 4, 5, 6, 7, 8]) == (1.5, 7.5)
