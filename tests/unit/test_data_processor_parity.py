"""Parity with transformers' Qwen2_5_VLProcessor built from the tiny checkpoint: pixel values (<= 1e-5),
grid_thw, second_per_grid_ts and input_ids (exact), for images and videos of odd sizes and lengths."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
from megatron_ral.data.pixels import preprocess_image, preprocess_video
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.prompts import get_template, sft_target, user_messages
from megatron_ral.data.records import parse_record


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    from transformers import AutoProcessor

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoProcessor.from_pretrained(str(path))
    return hf, QwenVLProcessor.from_pretrained(str(path))


def _hf(hf, messages, **kw):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=kw.pop("gen", True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(text=[text], return_tensors="pt", **kw)


def _msgs(kind, text="What is shown? Options:\nA. a\nB. b"):
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("size", [(45, 333), (37, 3001), (123, 77), (1001, 17), (28, 28), (600, 800)])
def test_image_parity(procs, size):
    hf, ours = procs
    g = torch.Generator().manual_seed(size[0] * 7 + size[1])
    img = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    lo, hi = 3136, 60000
    ref = _hf(hf, _msgs("image"), images=[pil], images_kwargs={"size": {"shortest_edge": lo, "longest_edge": hi}})
    vi = preprocess_image(img, ours.params, lo, hi)
    assert list(vi.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert vi.pixel_values.shape == ref["pixel_values"].shape
    assert (vi.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert torch.equal(ours.encode_prompt(_msgs("image"), [vi]), ref["input_ids"][0])


def test_image_with_alpha_is_composited_on_white(procs):
    hf, ours = procs
    rgba = np.random.default_rng(0).integers(0, 256, (40, 60, 4), dtype=np.uint8)
    pil = Image.fromarray(rgba, "RGBA")
    from megatron_ral.data.image import pil_to_tensor

    ref = _hf(hf, _msgs("image"), images=[pil], images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 20000}})
    vi = preprocess_image(pil_to_tensor(pil), ours.params, 3136, 20000)
    assert (vi.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape", [(1, 50, 70), (7, 61, 93), (5, 123, 301), (16, 64, 96), (2, 300, 40)])
def test_video_parity(procs, shape):
    from transformers.video_utils import VideoMetadata

    hf, ours = procs
    t, h, w = shape
    g = torch.Generator().manual_seed(t * 1000 + h + w)
    frames = torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)
    total, video_fps = 3 * t + 1, 7.5
    indices = torch.linspace(0, total - 1, t).round().long().tolist()
    meta = VideoMetadata(total_num_frames=total, fps=video_fps, frames_indices=indices, width=w, height=h)
    lo, hi = 3136, 30000
    ref = _hf(hf, _msgs("video"), videos=[frames.numpy()], video_metadata=[meta],
              videos_kwargs={"size": {"shortest_edge": lo, "longest_edge": hi}, "cap_pixels_per_frame": False, "do_sample_frames": False})
    vi = preprocess_video(frames.permute(0, 3, 1, 2), ours.params, lo, hi, 10**12, sample_fps=t / total * video_fps, frame_indices=indices)
    assert list(vi.grid_thw) == ref["video_grid_thw"][0].tolist()
    assert vi.grid_thw[0] == (t + 1) // 2  # temporal padding to a multiple of 2
    assert (vi.pixel_values - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    assert vi.second_per_grid_ts == pytest.approx(float(ref["second_per_grid_ts"][0]), rel=1e-6)
    assert torch.equal(ours.encode_prompt(_msgs("video"), [vi]), ref["input_ids"][0])


def test_video_total_pixel_budget_matches_capped_processor(procs):
    """With the total budget active, the per-frame cap (total / n * 2) equals transformers' cap_pixels_per_frame."""
    hf, ours = procs
    t, h, w = 6, 240, 320
    frames = torch.randint(0, 256, (t, h, w, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    max_video_tokens = 100
    total = int(max_video_tokens * 28 * 28 * 0.9)  # 70560, and 70560 * 2 / 6 is an integer
    video_processor = copy.deepcopy(hf.video_processor)
    video_processor.max_video_tokens = max_video_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = video_processor(videos=[frames.numpy()], size={"shortest_edge": 3136, "longest_edge": 602112},
                              cap_pixels_per_frame=True, do_sample_frames=False, return_tensors="pt")
    vi = preprocess_video(frames.permute(0, 3, 1, 2), ours.params, 3136, 602112, total, sample_fps=2.0)
    assert list(vi.grid_thw) == ref["video_grid_thw"][0].tolist()
    assert (vi.pixel_values - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    # The budget bites: the native 240x320 would round to 252x308.
    assert vi.meta["resized"][0] * vi.meta["resized"][1] <= total * 2 / t


RECORD = {
    "problem_id": 7, "problem": "Which colour appears last?", "data_type": "video", "problem_type": "multiple choice",
    "options": ["A. red", "B. green", "C. blue"], "solution": "<answer>B</answer>", "path": "v.webm",
    "process": "<think>It ends green.</think>",
}


@pytest.mark.parametrize("template", ["think", "answer_only"])
def test_record_prompt_and_sft_ids_match_processor(procs, template):
    hf, ours = procs
    from transformers.video_utils import VideoMetadata

    rec = parse_record(RECORD, "x.json:1")
    tpl = get_template(template)
    frames = torch.randint(0, 256, (4, 56, 84, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    meta = VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=[0, 2, 5, 7], width=84, height=56)
    kw = dict(videos=[frames.numpy()], video_metadata=[meta],
              videos_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 10000}, "cap_pixels_per_frame": False, "do_sample_frames": False})
    vi = preprocess_video(frames.permute(0, 3, 1, 2), ours.params, 3136, 10000, 10**12, sample_fps=2.0)
    messages = user_messages(rec, tpl, system_prompt="Be brief.")
    ref = _hf(hf, messages, **kw)
    prompt = ours.encode_prompt(messages, [vi])
    assert torch.equal(prompt, ref["input_ids"][0])
    # SFT: prompt + target equals the processor's tokenization of the whole conversation (minus the
    # template's trailing newline after <|im_end|>).
    target = sft_target(rec, tpl)
    full = _hf(hf, messages + [{"role": "assistant", "content": target}], gen=False, **kw)["input_ids"][0]
    ours_full = torch.cat([prompt, ours.encode_target(target)])
    assert torch.equal(ours_full, full[: len(ours_full)])
    assert ours.decode(full[len(ours_full):], skip_special_tokens=False) == "\n"
