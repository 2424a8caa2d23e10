"""tools/make_synthetic_videos.py and tools/preprocess.py (against transformers' processor on the same
decoded frames), run as command-line tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from megatron_ral.data.records import RecordIndex
from megatron_ral.data.video.probe import probe_video

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(*args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    summary = json.loads(run_tool("tools/make_synthetic_videos.py", "--out", out, "--n", "24", "--seed", "4", "--json"))
    return out, summary


def test_synthetic_dataset(synthetic):
    out, summary = synthetic
    train = RecordIndex.build([summary["train"]])
    test = RecordIndex.build([summary["test"]])
    assert len(train) + len(test) == 24 and len(test) >= 1
    records = [train.read(i, require_process=True) for i in range(len(train))] + [test.read(i) for i in range(len(test))]
    assert not {r.problem_id for r in records[: len(train)]} & {r.problem_id for r in records[len(train):]}
    kinds = {r.data_type for r in records}
    assert kinds == {"image", "video"}
    assert {r.problem_type for r in records} == {"multiple choice", "numerical"}
    for r in records:
        assert os.path.exists(r.media_path(out))
        assert r.process.startswith("<think>") and r.process.endswith("</think>")
        if r.problem_type == "multiple choice":
            assert r.answer in "ABCD" and len(r.options) == 4
            assert f"option {r.answer}" in r.process  # the rationale leads to the answer
        else:
            assert r.answer.isdigit() and r.answer in r.process
    video = next(r for r in records if r.data_type == "video")
    info = probe_video(video.media_path(out))
    assert info.codec == "vp9" and info.total_frames >= 16


def test_synthetic_h264(tmp_path):
    summary = json.loads(run_tool("tools/make_synthetic_videos.py", "--out", str(tmp_path), "--n", "4", "--codec", "h264",
                                  "--image-fraction", "0", "--json"))
    rec = json.load(open(summary["train"]))[0]
    assert rec["path"].endswith(".mp4")
    assert probe_video(os.path.join(str(tmp_path), rec["path"])).codec == "h264"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


def _hf_processor(ckpt):
    from transformers import AutoProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoProcessor.from_pretrained(ckpt)


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_preprocess_video_matches_transformers(synthetic, ckpt, tmp_path, backend):
    import av
    from transformers.video_utils import VideoMetadata

    out_dir, summary = synthetic
    rec = next(r for r in json.load(open(summary["train"])) if r["data_type"] == "video")
    video = os.path.join(out_dir, rec["path"])
    dest = str(tmp_path / "v.pt")
    run_tool("tools/preprocess.py", "--hf", ckpt, "--video", video, "--prompt", "How many squares?", "--fps", "2",
             "--backend", backend, "--out", dest)
    got = torch.load(dest)
    assert got["meta"]["backend"] == backend
    idx = got["frame_indices"].tolist()
    # Reference: transformers' processor on the same frames, decoded here independently: every frame in
    # order with the same backend (its colour conversion is held against FFmpeg's in test_data_video_colour).
    from megatron_ral.data.video.dali_backend import DaliDecoder
    from megatron_ral.data.video.pyav_backend import PyAVDecoder

    info = probe_video(video)
    decoder = DaliDecoder("cpu") if backend == "dali" else PyAVDecoder()
    frames = list(decoder.decode(info, list(range(info.total_frames))).permute(0, 2, 3, 1).numpy())
    with av.open(video) as c:
        assert len(frames) == sum(1 for _ in c.decode(video=0))
    total = len(frames)
    fps = float(info.fps)
    n = min(max(total / fps * 2, 4), total) // 2 * 2
    assert idx == torch.linspace(0, total - 1, int(n)).round().long().tolist()
    hf = _hf_processor(ckpt)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many squares?"}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(text=[text], videos=[np.stack([frames[i] for i in idx])], video_metadata=[meta], return_tensors="pt",
                 videos_kwargs={"do_sample_frames": False, "cap_pixels_per_frame": True})
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    assert torch.equal(got["video_grid_thw"], ref["video_grid_thw"])
    assert (got["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
    assert torch.allclose(got["second_per_grid_ts"], ref["second_per_grid_ts"])
    # M-RoPE temporal index of video grid step k: start + floor(k * second_per_grid_ts * tokens_per_second).
    pos = got["position_ids"]
    assert pos.shape == (3,) + tuple(got["input_ids"].shape)
    is_video = got["input_ids"][0] == hf.video_token_id
    start = int(torch.nonzero(is_video)[0])
    t, h, w = got["video_grid_thw"][0].tolist()
    temporal = pos[0, 0, is_video].view(t, h // 2 * (w // 2))
    spgt = float(got["second_per_grid_ts"][0])
    for k in range(t):
        assert bool((temporal[k] == start + int(k * spgt * 2)).all())


def test_preprocess_image_matches_transformers(synthetic, ckpt, tmp_path):
    from PIL import Image

    out_dir, summary = synthetic
    records = json.load(open(summary["train"])) + json.load(open(summary["test"]))
    image = os.path.join(out_dir, next(r for r in records if r["data_type"] == "image")["path"])
    dest = str(tmp_path / "i.pt")
    run_tool("tools/preprocess.py", "--hf", ckpt, "--image", image, "--min-pixels", "3136", "--max-pixels", "20000", "--out", dest)
    got = torch.load(dest)
    hf = _hf_processor(ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(text=[text], images=[Image.open(image)], return_tensors="pt",
                 images_kwargs={"size": {"shortest_edge": 3136, "longest_edge": 20000}})
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert (got["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert "second_per_grid_ts" not in got and got["position_ids"].shape[0] == 3
