"""smart_resize, the per-frame video pixel budget and token counts against transformers and hand calculation."""

from __future__ import annotations

import math
import random

import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from megatron_ral.data.geometry import VisionParams, grid_thw, num_llm_tokens, smart_resize, video_frame_max_pixels, video_resize_target


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = random.Random(0)
    for _ in range(2000):
        h = rng.randint(1, 3000)
        w = rng.randint(max(1, h // 150), min(3000, h * 150))
        lo = rng.choice([56 * 56, 128 * 28 * 28, 4 * 28 * 28, 1000])
        hi = rng.choice([28 * 28 * 1280, 128 * 28 * 28, 768 * 28 * 28, 5000, 12845056])
        hi = max(hi, lo)
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_hand_values():
    # 1080x1920 within 768*28*28 = 602112 px: round -> 1092x1932 = 2109744 > max -> beta = sqrt(2073600/602112)
    beta = math.sqrt(1080 * 1920 / 602112)
    expected = (math.floor(1080 / beta / 28) * 28, math.floor(1920 / beta / 28) * 28)
    assert smart_resize(1080, 1920, 28, 128 * 784, 602112) == expected == (560, 1008)
    # Tiny image scaled up to min_pixels.
    assert smart_resize(10, 10, 28, 56 * 56, 10**9) == (56, 56)
    # Multiples of 28 inside the limits stay put.
    assert smart_resize(280, 504, 28, 56 * 56, 10**9) == (280, 504)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    assert smart_resize(10, 2000, 28, 56 * 56, 10**9)[0] == 28  # ratio 200 is allowed


def test_video_frame_budget_qwen_vl_utils_rule():
    total = int(128000 * 28 * 28 * 0.9)
    # Few frames: the share exceeds the 768-cell ceiling, so the user max applies.
    assert video_frame_max_pixels(8, 128 * 784, 768 * 784, total) == 768 * 784
    # Many frames: even share of the total budget: total / n * 2.
    n = 760
    assert video_frame_max_pixels(n, 128 * 784, 768 * 784, total) == pytest.approx(total / n * 2)
    # Tiny budget: never below int(1.05 * min_pixels) unless the user max is lower.
    assert video_frame_max_pixels(100, 128 * 784, 768 * 784, 1000) == int(128 * 784 * 1.05)
    assert video_frame_max_pixels(100, 128 * 784, 100 * 784, 1000) == 100 * 784


def test_video_resize_target_uses_budget():
    p = VisionParams()
    total = 64 * 784 * 4  # 4 frames' worth of 64 cells each at temporal patch 2 -> share = total / n * 2
    h, w = video_resize_target(720, 1280, 8, p, 16 * 784, 768 * 784, total)
    assert h * w <= total / 8 * 2
    assert (h, w) == smart_resize(720, 1280, 28, 16 * 784, total / 8 * 2)


def test_grid_and_tokens():
    p = VisionParams()
    assert p.patch_dim == 1176 and p.factor == 28
    assert grid_thw(7, 56, 84, p) == (4, 4, 6)
    assert grid_thw(1, 28, 28, p) == (1, 2, 2)
    assert num_llm_tokens((4, 4, 6)) == 24
