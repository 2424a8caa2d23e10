"""Frame sampling: qwen-vl-utils frame counts and indices, tiny videos, the token budget subsampling."""

from __future__ import annotations

import math

import pytest

from megatron_ral.data.geometry import VisionParams, grid_thw, num_llm_tokens, video_resize_target
from megatron_ral.data.video.sampling import fit_token_budget, plan_frames, qwen_frame_indices, qwen_num_frames


def _reference_nframes(total, video_fps, fps, min_frames, max_frames):
    # qwen-vl-utils smart_nframes, written out by hand.
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(max_frames / 2) * 2
    n = total / video_fps * fps
    n = min(min(max(n, lo), hi), total)
    return math.floor(n / 2) * 2


@pytest.mark.parametrize(
    "total,video_fps,fps,lo,hi",
    [(300, 30.0, 2.0, 4, 768), (301, 29.97, 1.0, 4, 128), (7, 8.0, 2.0, 4, 768), (5, 25.0, 2.0, 4, 768),
     (10000, 30.0, 1.0, 4, 128), (2, 8.0, 2.0, 4, 768), (3, 8.0, 2.0, 4, 768), (100, 10.0, 0.5, 3, 9)],
)
def test_num_frames_matches_qwen_rule(total, video_fps, fps, lo, hi):
    assert qwen_num_frames(total, video_fps, fps, lo, hi) == _reference_nframes(total, video_fps, fps, lo, hi)


def test_hand_examples():
    # 10 s at 30 fps sampled at 2 fps -> 20 frames; indices linspace(0, 299, 20) rounded.
    plan = plan_frames(300, 30.0, 2.0, 4, 768)
    assert plan.num_frames == 20
    assert plan.indices[0] == 0 and plan.indices[-1] == 299
    assert plan.indices == [round(i * 299 / 19) for i in range(20)]  # no x.5 ties here
    assert plan.sample_fps == pytest.approx(20 / 300 * 30.0)
    assert plan.second_per_grid_ts() == pytest.approx(2 / 2.0)
    # Long video at 1 fps with max 128 frames: clamped to 128, spread over the whole video.
    plan = plan_frames(36000, 30.0, 1.0, 4, 128)
    assert plan.num_frames == 128 and plan.indices[-1] == 35999
    assert plan.sample_fps == pytest.approx(128 / 36000 * 30)


def test_indices_round_half_to_even_like_torch():
    # linspace(0, 9, 7) = 0, 1.5, 3, 4.5, 6, 7.5, 9 -> torch.round: 0, 2, 3, 4, 6, 8, 9
    assert qwen_frame_indices(10, 7) == [0, 2, 3, 4, 6, 8, 9]


def test_one_frame_video():
    plan = plan_frames(1, 25.0, 2.0, 4, 768)
    assert plan.indices == [0]
    assert plan.sample_fps == pytest.approx(25.0)


def test_token_budget_subsamples_whole_video():
    p = VisionParams()
    total_px = int(128000 * 784 * 0.9)
    plan = plan_frames(3000, 30.0, 2.0, 4, 768)  # 200 frames
    h, w = 224, 224

    def tokens(n):
        rh, rw = video_resize_target(h, w, n, p, 16 * 784, 64 * 784, total_px)
        return num_llm_tokens(grid_thw(n, rh, rw, p))

    budget = 1000
    assert tokens(plan.num_frames) > budget
    fitted = fit_token_budget(plan, h, w, p, 16 * 784, 64 * 784, total_px, budget)
    assert tokens(fitted.num_frames) <= budget < tokens(fitted.num_frames + 2)
    assert fitted.num_frames % 2 == 0
    # Never the first frames only: the indices still span the whole video.
    assert fitted.indices[0] == 0 and fitted.indices[-1] == 2999
    assert fitted.indices == qwen_frame_indices(3000, fitted.num_frames)
    assert fitted.sample_fps == pytest.approx(fitted.num_frames / 3000 * 30.0)
    # Within budget: unchanged.
    assert fit_token_budget(plan, h, w, p, 16 * 784, 64 * 784, total_px, 10**9) is plan
