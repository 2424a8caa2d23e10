"""Packed training micro-batches (``training.packing``): the planner by hand, each sequence's M-RoPE positions
equal to those it has alone, and one update pass packed (``sequences``, ``groups``) equal to the padded one
(``none``): logits at the response positions, per-token log-probs, attention rows and the loss gradient
within 1e-5, for image, video, two-image and text-only sequences of very different lengths, with every
loss aggregation (the attention term included), untied GQA 2:1 and tied GQA 4:1 models."""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.inference.prompts import PromptInput
from megatron_ral.models.qwen25vl.rope_index import RopeIndexConfig, get_rope_index
from megatron_ral.platform import destroy, initialize
from megatron_ral.rl.batch import RolloutBatch
from megatron_ral.rl.packing import (
    PackingSettings,
    balanced_bins,
    plan_packed_micro_batches,
    resolve_packing,
)
from megatron_ral.testing.models import TOKEN_IDS, seeded_megatron_model
from megatron_ral.testing.packing import compare_results, packing_batch, pass_results

PAD = 0
ROPE = RopeIndexConfig(image_token_id=TOKEN_IDS["<|image_pad|>"], video_token_id=TOKEN_IDS["<|video_pad|>"])


def _text_batch(prompt_lengths=(3, 5), response_lengths=((2, 1), (3, 2))) -> RolloutBatch:
    prompts = [PromptInput(torch.arange(10 * (p + 1), 10 * (p + 1) + n)) for p, n in enumerate(prompt_lengths)]
    responses = [[torch.arange(100 + 10 * g, 100 + 10 * g + n) for g, n in enumerate(row)] for row in response_lengths]
    shape = (len(prompts), len(response_lengths[0]))
    adv = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    z = torch.zeros(shape)
    return RolloutBatch(prompts=prompts, records=[None] * len(prompts), prompt_keys=list(range(len(prompts))),
                        responses=responses, texts=[[""] * shape[1]] * shape[0],
                        finish_reasons=[["stop"] * shape[1]] * shape[0], rewards=z, accuracy=z, format=z,
                        advantages=adv, zero_std=torch.zeros(shape[0], dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ planning
def test_balanced_bins():
    assert balanced_bins([5, 5, 5, 5], 10) == [[0, 2], [1, 3]]  # longest first into the least filled bin
    # first-fit decreasing needs 2 bins ([8, 2], [7, 3]... loads 10 / 10); the bins are balanced, not filled in turn
    bins = balanced_bins([8, 7, 3, 2], 10)
    assert sorted(sum([8, 7, 3, 2][i] for i in b) for b in bins) == [10, 10]
    # 6 items of 3 under 10: FFD fills 3 + 3 + 3 and 3 + 3 + 3 -> 2 bins of 9
    assert [len(b) for b in balanced_bins([3] * 6, 10)] == [3, 3]
    # an item above the budget runs alone; the others are still packed
    assert balanced_bins([12, 4, 4], 10) == [[0], [1, 2]]
    for sizes, budget in (([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 10), ([4, 4, 4, 3, 3, 3, 2, 2], 9), ([1] * 7, 3)):
        bins = balanced_bins(sizes, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= budget for b in bins)
        loads = [sum(sizes[i] for i in b) for b in bins]
        assert max(loads) - min(loads) <= max(sizes)


def test_resolve_packing():
    assert resolve_packing("auto", "ral", "local") == "groups"
    assert resolve_packing("auto", "sft", "local") == "sequences"
    assert resolve_packing("auto", "ral", "te") == "none"
    assert resolve_packing("auto", "grpo", "local", context_parallel_size=2) == "none"
    assert resolve_packing("sequences", "ral", "local") == "sequences"
    assert resolve_packing("sequences", "ral", "te") == "sequences"   # TE's THD path
    with pytest.raises(ValueError, match="local layer spec"):
        resolve_packing("groups", "ral", "te")
    with pytest.raises(ValueError, match="context parallelism"):
        resolve_packing("sequences", "sft", "te", context_parallel_size=2)


def test_packed_sequences_by_hand():
    batch = _text_batch()
    (mb,) = plan_packed_micro_batches(batch, 1, PackingSettings("sequences", 100, ROPE), PAD)
    # sequences (p0,g0)=3+2, (p0,g1)=3+1, (p1,g0)=5+3, (p1,g1)=5+2 back to back
    assert [(r.prompt, r.sample) for r in mb.refs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    p0, p1 = [10, 11, 12], [20, 21, 22, 23, 24]
    assert mb.packed.input_ids[0].tolist() == p0 + [100, 101] + p0 + [110] + p1 + [100, 101, 102] + p1 + [110, 111]
    # the position predicting each response token, and the token
    assert mb.packed.loss_index[0].tolist() == [2, 3, 7, 13, 14, 15, 21, 22]
    assert mb.packed.labels[0].tolist() == [100, 101, 110, 100, 101, 102, 110, 111]
    assert mb.forward_shape == (1, 24) and mb.token_positions == 24 and mb.num_tokens == 8
    assert mb.vision_rows == [0, 0, 1, 1]
    # per-sequence tensors keep the padded layout's meaning
    assert mb.response_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True],
                                         [True, True, False]]
    assert mb.input_ids[2].tolist() == p1 + [100, 101, 102] and mb.advantages.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert mb.layout.row_index[2].tolist() == [5, 6, 7]
    assert mb.layout.stream_index[2, :8].tolist() == list(range(9, 17))
    # each sequence's positions are its own (text: 0..n-1), not the stream's
    assert mb.packed.layout.position_ids[0, 0].tolist() == [*range(5), *range(4), *range(8), *range(7)]
    # token_logprobs maps the stream's [1, N] loss to the rows [B, R]
    logp = mb.token_logprobs(-torch.arange(1.0, 9.0)[None])
    assert logp.tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 8, 0]]


def test_groups_by_hand_with_sub_streams():
    batch = _text_batch(prompt_lengths=(3, 5), response_lengths=((2, 1, 4), (3, 2, 6)))
    mbs = plan_packed_micro_batches(batch, 1, PackingSettings("groups", 11, ROPE), PAD)
    # group 0: 3 + (2 + 1 + 4) = 10 fits; group 1: 5 + 11 > 11 -> sub-streams of <= 6 response tokens
    # ([6], [3, 2]), each carrying the prompt; then 10, 11, 10 packed one stream each under 11
    streams = [(m.packed.layout.spans, [(r.prompt, r.sample) for r in m.refs]) for m in mbs]
    assert [refs for _, refs in streams] == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1)], [(1, 2)]]
    first = mbs[0]
    assert first.packed.input_ids[0].tolist() == [10, 11, 12, 100, 101, 110, 120, 121, 122, 123]
    # the prompt's last position (2) predicts every response's first token
    assert first.packed.loss_index[0].tolist() == [2, 3, 2, 2, 6, 7, 8]
    assert first.packed.labels[0].tolist() == [100, 101, 110, 120, 121, 122, 123]
    # responses continue from the prompt's positions
    assert first.packed.layout.position_ids[0, 0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5, 6]
    # the capture's rows: sample 2's keys are its prompt (stream 0..2) and its own response (stream 6..9)
    assert first.layout.stream_index[2].tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert first.layout.row_index[2].tolist() == [3, 4, 5, 6]
    mask = first.packed.layout.dense_mask()
    assert not mask[6:, 3:6].any() and mask[6:, :3].all()  # response 3 never sees responses 1-2
    assert mbs[1].packed.input_ids[0].tolist()[:5] == [20, 21, 22, 23, 24] and mbs[1].vision_rows == [1]


def test_minibatches_are_the_padded_ones_and_zero_std_groups_drop():
    from megatron_ral.rl.batch import plan_micro_batches

    batch = _text_batch(prompt_lengths=(3, 5, 4), response_lengths=((2, 1), (3, 2), (1, 1)))
    batch.zero_std = torch.tensor([False, True, False])
    padded = plan_micro_batches(batch, 2, 1, PAD, drop_zero_std_groups=True)
    for kind in ("sequences", "groups"):
        packed = plan_packed_micro_batches(batch, 2, PackingSettings(kind, 7, ROPE), PAD, drop_zero_std_groups=True)
        for m in (0, 1):
            want = sorted((r.prompt, r.sample) for mb in padded if mb.minibatch == m for r in mb.refs)
            got = sorted((r.prompt, r.sample) for mb in packed if mb.minibatch == m for r in mb.refs)
            assert got == want
        assert all(mb.packed.length <= 7 for mb in packed)
    # everything dropped: one zero-weight sequence per mini-batch, packed too
    batch.zero_std = torch.tensor([True, True, True])
    packed = plan_packed_micro_batches(batch, 2, PackingSettings("groups", 7, ROPE), PAD, drop_zero_std_groups=True)
    assert len(packed) == 2 and all(mb.num_sequences == 0 and mb.size == 1 for mb in packed)


def test_stream_tail_padding_to_a_multiple():
    batch = _text_batch()
    (mb,) = plan_packed_micro_batches(batch, 1, PackingSettings("groups", 100, ROPE, pad_to_multiple=5), PAD)
    # 3 + 2 + 1 and 5 + 3 + 2 = 16 tokens, only the tail padded (to 20)
    assert mb.packed.length == 20 and mb.packed.input_ids[0, 16:].tolist() == [PAD] * 4
    assert mb.packed.layout.num_tokens == 16


# ------------------------------------------------------------------------------------------------ positions
def test_positions_of_each_packed_sequence_are_those_it_has_alone():
    """Video (0.5 s per grid step), two images, image, text only: the stream's per-token M-RoPE ids of each
    sequence equal the rope index of that sequence alone (prompt + response), in both packed layouts."""
    batch = packing_batch()
    for kind in ("sequences", "groups"):
        seen = 0
        for mb in plan_packed_micro_batches(batch, 1, PackingSettings(kind, 48, ROPE), PAD):
            per_seq = mb.packed.layout.gather(mb.packed.layout.position_ids.permute(1, 0, 2), dim=1)
            spans = [s for s in mb.packed.layout.sequences]
            refs = [r for r, n in zip(mb.refs, mb.response_lengths) if n > 0]
            assert len(spans) == len(refs) == len(per_seq)
            for ref, pos in zip(refs, per_seq):
                prompt = batch.prompts[ref.prompt]
                ids = torch.cat([prompt.input_ids, batch.responses[ref.prompt][ref.sample]])[None]
                alone, _ = get_rope_index(ids, ROPE, prompt.image_grid_thw, prompt.video_grid_thw,
                                          prompt.second_per_grid_ts)
                assert torch.equal(pos, alone[:, 0]), (kind, ref)
                seen += 1
        assert seen == 12
    # the video prompt's temporal positions step by 1 per grid step (0.5 s x 2 tokens/s): timing kept
    video = batch.prompts[1]
    pos, _ = get_rope_index(video.input_ids[None], ROPE, video_grid_thw=video.video_grid_thw,
                            second_per_grid_ts=video.second_per_grid_ts)
    vid = pos[0, 0][video.input_ids == ROPE.video_token_id]
    assert vid.unique().numel() == 4


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def platform():
    initialize(ParallelConfig(), seed=1234)
    yield
    destroy()


@pytest.fixture(scope="module", params=["tiny", "small"])  # GQA 2:1 untied, GQA 4:1 tied
def model(request, platform):
    return seeded_megatron_model(request.param, seed=5, vision_attn_implementation="eager")


@pytest.mark.parametrize("aggregation,attn_aggregation,minibatches", [
    ("token_mean", "token_mean", 1), ("seq_mean_token_mean", "sum", 3), ("seq_mean_token_sum_norm", "token_mean", 2)])
def test_packed_pass_equals_padded(model, aggregation, attn_aggregation, minibatches):
    batch = packing_batch()
    kwargs = dict(budget=48, micro_batch_size=4, aggregation=aggregation, attn_aggregation=attn_aggregation,
                  num_minibatches=minibatches)
    ref = pass_results([model], model, batch, "none", **kwargs)
    assert ref["grads"] and max(g.abs().max().item() for g in ref["grads"].values()) > 0
    assert any(r.numel() and r.abs().max() > 0 for r in ref["rows"].values())
    for kind in ("sequences", "groups"):
        got = pass_results([model], model, batch, kind, **kwargs)
        # not vacuous: the packed passes compute fewer positions in more, shorter streams
        assert got["token_positions"] < ref["token_positions"]
        compare_results(ref, got, f"{kind} {aggregation}")


def test_groups_share_the_prompt_and_split_over_the_budget():
    batch = packing_batch()
    mbs = plan_packed_micro_batches(batch, 1, PackingSettings("groups", 48, ROPE), PAD)
    # the image prompt (19 tokens, responses 23 + 1 + 9) is split in two sub-streams, one with two responses
    image = [mb for mb in mbs if 0 in mb.vision_rows]
    assert sorted(len([r for r in mb.refs if r.prompt == 0]) for mb in image) == [1, 2]
    # the text prompt's group (13 + 2 + 8 + 15 = 38) runs its prompt once for three responses
    text = [mb for mb in mbs if 3 in mb.vision_rows]
    assert len(text) == 1 and sum(mb.vision_rows.count(3) for mb in mbs) == 1
    assert len([r for r in text[0].refs if r.prompt == 3]) == 3


def test_p_old_stores_of_a_packed_stream_give_its_rows(model):
    """The old pass's capture on a groups stream: the "qk" store (the stream's K once, recomputed) and the
    "rows" store (fp32) give back exactly the captured rows, [B, R, T] as the padded path's."""
    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.rl.schedule import PassContext, run_pass
    from megatron_ral.rl.vision import encode_prompts_vision

    batch = packing_batch()
    mbs = plan_packed_micro_batches(batch, 1, PackingSettings("groups", 48, model.rope_config), 1000)
    qk = make_old_policy_store(OldPolicyConfig(mode="qk"))
    rows = make_old_policy_store(OldPolicyConfig(mode="rows", dtype="fp32"))
    seen = {}

    def consume(mb, token_loss, result):
        qk.put(mb.index, result.qk)
        rows.put(mb.index, result.qk)
        seen[mb.index] = result.rows
        assert result.qk.k.shape[:2] == (mb.packed.length, 1)  # the stream's keys, each once
        return None, {}

    ctx = PassContext(model=[model], vision=encode_prompts_vision(model, batch.prompts),
                      capture=AttentionCapture(model))
    run_pass(ctx, mbs, consume, forward_only=True,
             capture_kwargs=lambda mb: {"grad": False, "keep_rows": True, "keep_qk": True})
    for mb in mbs:
        b, r = len(mb.refs), max(mb.response_lengths)
        assert tuple(seen[mb.index].shape) == (b, r, max(p + n for p, n in zip(mb.prompt_lengths, mb.response_lengths)))
        assert torch.equal(qk.get(mb.index), seen[mb.index])
        assert torch.equal(rows.get(mb.index), seen[mb.index])


@pytest.mark.parametrize("divergence,aggregation", [("jsd", "token_mean"), ("kl", "sum"), ("reverse_kl", "token_mean")])
def test_attention_term_over_the_counted_rows_is_the_full_rows_term(divergence, aggregation):
    """minibatch_loss takes the attention divergence over the counted rows only; the value and the gradient
    are those of the term over every row of [B, R, T] composed by hand (padding rows have weight 0)."""
    from megatron_ral.rl import losses as L
    from megatron_ral.rl.batch import plan_micro_batches
    from megatron_ral.rl.update import LossSettings, minibatch_loss

    batch = _text_batch(prompt_lengths=(3, 5), response_lengths=((2, 1), (3, 2)))
    (mb,) = plan_micro_batches(batch, 1, 4, PAD)
    mb.weight[1] = 0.0  # a zero-weight sequence counts nowhere
    gen = torch.Generator().manual_seed(0)
    b, r, t = len(mb.refs), max(mb.response_lengths), mb.seq_length
    support = mb.layout.policy_key_mask(t)

    def rows_like():
        x = torch.rand(b, r, t, generator=gen, dtype=torch.float64) * support
        return x / x.sum(-1, keepdim=True).clamp_min(1e-30)

    rows, p_old = rows_like().requires_grad_(True), rows_like()
    logp = -torch.rand(b, r, generator=gen, dtype=torch.float64)
    norms = {"tokens": 7.0, "sequences": 3.0}
    s = LossSettings(lambda_attn=2.0, attn_divergence=divergence, attn_aggregation=aggregation)
    loss, metrics = minibatch_loss(mb, logp, logp, None, rows, p_old, norms, s)
    (grad,) = torch.autograd.grad(loss, rows)
    valid = mb.response_mask & (mb.weight[:, None] > 0)
    rows2 = rows.detach().clone().requires_grad_(True)
    pg, _ = L.clipped_surrogate(logp, logp, mb.advantages.double(), 0.2)
    want = L.aggregate(pg, L.token_weights(valid, "token_mean"), 7.0) + 2.0 * L.aggregate(
        L.attention_loss(rows2, p_old, mb.advantages.double(), divergence), L.token_weights(valid, aggregation),
        norms[L.normaliser_kind(aggregation)])
    (grad2,) = torch.autograd.grad(want, rows2)
    assert abs(float(loss) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
    assert float(grad.abs().max()) > 0 and torch.allclose(grad, grad2, rtol=0, atol=1e-12)
    assert metrics["attn/jsd_tokens"] == float(valid.sum())
