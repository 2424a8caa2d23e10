"""The full Megatron Qwen2.5-VL model on a packed stream equals the padded path.

Packed ``sequences`` (an image, a video with 0.5 s per grid step and a text-only sequence, each with the
M-RoPE positions it has alone) and shared-prompt ``groups`` (an image prompt with 3 responses and a video
prompt with 2, each prompt and its vision features once): logits at every real token within 1e-5 of the
right-padded batch, and the parameter gradient of a loss over the response tokens equal to the padded one
(the prompt's gradient is the sum over its responses).
"""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout
from megatron_ral.testing.models import TOKEN_IDS, make_prompt, seeded_megatron_model
from megatron_ral.platform import destroy, initialize

PAD = TOKEN_IDS["<|endoftext|>"]
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=1234)
    yield
    destroy()


@pytest.fixture(scope="module", params=["tiny", "small"])  # GQA 2:1 untied, GQA 4:1 tied
def model(request):
    return seeded_megatron_model(request.param, seed=5, vision_attn_implementation="eager").eval()


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [ids[i, : int(mask[i].sum())] for i in range(ids.shape[0])]


def _right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _positions(model, ids, mask, **vision) -> list[torch.Tensor]:
    pos, _ = model.compute_position_ids(ids, vision.get("image_grid_thw"), vision.get("video_grid_thw"),
                                        vision.get("second_per_grid_ts"), mask)
    return [pos[:, i, : int(mask[i].sum())] for i in range(ids.shape[0])]


def _vision(prompt) -> dict:
    return {k: v for k, v in prompt.model_inputs().items() if k not in ("input_ids", "attention_mask")}


def _packed_sequences_case(model):
    prompt = make_prompt([[6, ("image", (1, 4, 6)), 5], [4, ("video", (2, 4, 8)), 7], [9]], seed=21,
                         second_per_grid_ts=[0.5], padding_side="right")
    vision = _vision(prompt)
    rows = _rows(prompt.input_ids, prompt.attention_mask)
    positions = _positions(model, prompt.input_ids, prompt.attention_mask, **vision)
    # each sequence's positions are the ones it has alone (video timing included)
    alone = [
        _positions(model, rows[0][None], torch.ones(1, len(rows[0])), image_grid_thw=vision["image_grid_thw"])[0],
        _positions(model, rows[1][None], torch.ones(1, len(rows[1])), video_grid_thw=vision["video_grid_thw"],
                   second_per_grid_ts=vision["second_per_grid_ts"])[0],
        _positions(model, rows[2][None], torch.ones(1, len(rows[2])))[0],
    ]
    assert all(torch.equal(a, b) for a, b in zip(positions, alone))
    layout = AttentionLayout.packed_sequences([len(r) for r in rows], position_ids=positions, pad_to_multiple=4)
    padded = dict(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, **vision)
    packed = dict(input_ids=layout.scatter(rows, pad_value=PAD), layout=layout, **vision)
    loss_rows = [torch.arange(len(r)) for r in rows]  # every real token
    return padded, packed, layout, loss_rows


def _groups_case(model):
    image = make_prompt([4, ("image", (1, 4, 4)), 3], seed=31)
    video = make_prompt([2, ("video", (2, 4, 4)), 5], seed=32, second_per_grid_ts=[0.5])
    gen = torch.Generator().manual_seed(33)
    groups = [(image, [5, 2, 7]), (video, [3, 4])]
    rows, loss_rows = [], []
    for prompt, responses in groups:
        p = prompt.input_ids[0]
        for r in responses:
            rows.append(torch.cat([p, torch.randint(0, 900, (r,), generator=gen)]))
            loss_rows.append(torch.arange(len(p), len(p) + r))
    ids, mask = _right_padded(rows)
    # the padded path: every response row carries its prompt and its vision inputs
    reps = [len(r) for _, r in groups]
    padded_vision = dict(
        pixel_values=image.pixel_values.repeat(reps[0], 1), image_grid_thw=image.image_grid_thw.repeat(reps[0], 1),
        pixel_values_videos=video.pixel_values_videos.repeat(reps[1], 1),
        video_grid_thw=video.video_grid_thw.repeat(reps[1], 1),
        second_per_grid_ts=video.second_per_grid_ts.repeat(reps[1]))
    positions = _positions(model, ids, mask, **padded_vision)
    layout = AttentionLayout.shared_prompt_groups(
        [(prompt.input_ids.shape[1], r) for prompt, r in groups], position_ids=positions, pad_to_multiple=4)
    stream_vision = dict(pixel_values=image.pixel_values, image_grid_thw=image.image_grid_thw,
                         pixel_values_videos=video.pixel_values_videos, video_grid_thw=video.video_grid_thw,
                         second_per_grid_ts=video.second_per_grid_ts)
    padded = dict(input_ids=ids, attention_mask=mask, **padded_vision)
    packed = dict(input_ids=layout.scatter(rows, pad_value=PAD), layout=layout, **stream_vision)
    return padded, packed, layout, loss_rows


CASES = {"sequences": _packed_sequences_case, "groups": _groups_case}


def _weighted_loss(per_seq_logits, loss_rows, seed=7):
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for logits, rows in zip(per_seq_logits, loss_rows):
        w = torch.randn(len(rows), logits.shape[-1], generator=gen)
        total = total + (logits[rows] * w).sum()
    return total


def _grads(model):
    return {n: p.grad.clone() for n, p in model.language_model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_stream_equals_padded_path(model, case):
    padded, packed, layout, loss_rows = CASES[case](model)
    assert layout.length < padded["input_ids"].numel()  # the stream is shorter than the padded batch
    results = []
    for inputs in (padded, packed):
        model.zero_grad(set_to_none=True)
        logits = model(**inputs)
        if inputs is padded:
            per_seq = [logits[i, : int(inputs["attention_mask"][i].sum())] for i in range(logits.shape[0])]
        else:
            assert logits.shape[:2] == (1, layout.length)
            per_seq = layout.gather(logits)
        _weighted_loss(per_seq, loss_rows).backward()
        results.append(([t.detach() for t in per_seq], _grads(model)))
    (ref_logits, ref_grads), (got_logits, got_grads) = results
    for i, (got, ref) in enumerate(zip(got_logits, ref_logits)):
        diff = (got - ref).abs().max().item()
        assert diff < TOL, f"sequence {i}: max |logit diff| {diff}"
    assert set(got_grads) == set(ref_grads) and ref_grads
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        assert scale > 0, name
        diff = (got_grads[name] - ref).abs().max().item()
        assert diff <= TOL * max(1.0, scale), f"{name}: max |grad diff| {diff} (scale {scale})"


def test_the_layout_matters(model):
    """Guard: the same stream as one plain causal sequence (no layout) gives other logits after the first
    sequence, and text positions instead of the rollout's change the vision tokens' logits."""
    padded, packed, layout, _ = _groups_case(model)
    with torch.no_grad():
        good = layout.gather(model(**packed))
        inputs = {k: v for k, v in packed.items() if k != "layout"}
        plain = layout.gather(model(**inputs, position_ids=layout.position_ids))
        recomputed = AttentionLayout.shared_prompt_groups([(layout.spans[0].length, [5, 2, 7]),
                                                           (layout.spans[4].length, [3, 4])], pad_to_multiple=4)
        text_pos = layout.gather(model(**dict(packed, layout=recomputed)))
    assert (good[1] - plain[1]).abs().max() > 1e-3  # the second response no longer sees the first
    assert (good[0] - text_pos[0]).abs().max() > 1e-3


def test_layout_refusals(model, monkeypatch):
    _, packed, layout, _ = _packed_sequences_case(model)
    _, grouped, _, _ = _groups_case(model)
    with monkeypatch.context() as m:  # the checks under the TE spec's name (its layers read 'sequences' only)
        m.setattr(model, "backend", "te")
        with pytest.raises(ValueError, match="needs the local layer spec"):
            model(**grouped)
        positions, params = model._layout_inputs(layout, packed["input_ids"], None, None, None)
        assert params.layout is layout and torch.equal(positions, layout.position_ids)
        m.setattr(model.config, "context_parallel_size", 2)
        with pytest.raises(ValueError, match="with context parallelism needs the local layer spec"):
            model._layout_inputs(layout, packed["input_ids"], None, None, None)
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with pytest.raises(ValueError, match="do not hold the layout's stream"):
        model(**dict(packed, input_ids=packed["input_ids"][:, :-4]))
