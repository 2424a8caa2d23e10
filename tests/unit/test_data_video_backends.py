"""DALI (CPU) and PyAV decode the same frame indices of the same VP9 file to the same pixels (within one
level: DALI's RGB comes from FFmpeg's fixed-point converter, PyAV's from the shared torch step on the
planes); seeking decode equals plain sequential decode; backend selection per codec and device."""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest
import torch

from megatron_ral.data.synthetic import write_video
from megatron_ral.data.video.backend import VideoDecoders, log_choice_once, select_backend
from megatron_ral.data.video.dali_backend import DaliDecoder
from megatron_ral.data.video.probe import probe_video
from megatron_ral.data.video.pyav_backend import PyAVDecoder
from megatron_ral.data.video.sampling import plan_frames


def _frames(t, h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i] = np.roll(base, 3 * i, axis=1)
        out[i, : h // 3, : w // 3] = ((40 * i) % 256, 200, 30)
    return out


def _encode(path, frames, fps, codec="libvpx-vp9", gop=None):
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.gop_size = gop
        if codec == "libvpx-vp9":
            s.options = {"crf": "30", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _reference_all_frames(path):
    """Every frame as RGB, decoded by plain PyAV in order (no seeking), converted by the shared colour
    step (tests/unit/test_data_video_colour.py holds that step against FFmpeg's own conversion)."""
    from megatron_ral.data.video.colour import frame_planes, planes_to_rgb

    colour = probe_video(str(path)).colour
    with av.open(str(path)) as c:
        return [planes_to_rgb(*(torch.from_numpy(p)[None] for p in frame_planes(f)), colour)[0]
                for f in c.decode(video=0)]


@pytest.mark.parametrize("shape,fps", [((41, 61, 93), 10), ((9, 50, 70), 8), ((1, 33, 47), 5)])
def test_dali_and_pyav_agree_on_vp9(tmp_path, shape, fps):
    t, h, w = shape
    path = tmp_path / "clip.webm"
    _encode(path, _frames(t, h, w), fps)
    info = probe_video(str(path))
    assert info.codec == "vp9" and (info.height, info.width) == (h, w)
    assert info.total_frames == len(_reference_all_frames(path)) == t
    plan = plan_frames(info.total_frames, info.fps, 2.0, 4, 768)
    dali = DaliDecoder("cpu").decode(info, plan.indices)
    pyav = PyAVDecoder().decode(info, plan.indices)
    assert dali.dtype == pyav.dtype == torch.uint8
    assert dali.shape == pyav.shape == (len(plan.indices), 3, h, w)
    diff = (dali.int() - pyav.int()).abs()
    assert diff.max().item() <= 1, diff.max()
    assert (diff > 0).float().mean().item() < 0.02
    # The frames are the requested ones: compare with an independent full decode.
    ref = _reference_all_frames(path)
    for k, idx in enumerate(plan.indices):
        assert torch.equal(pyav[k], ref[idx])
        if t > 1:  # neighbouring frames differ, so equality pins the index
            assert not torch.equal(ref[idx], ref[idx - 1 if idx else 1])


def test_arbitrary_and_repeated_indices(tmp_path):
    path = tmp_path / "clip.webm"
    _encode(path, _frames(30, 48, 64), 10)
    info = probe_video(str(path))
    idx = [29, 0, 7, 7, 15]
    a, b = DaliDecoder("cpu").decode(info, idx), PyAVDecoder().decode(info, idx)
    assert (a.int() - b.int()).abs().max().item() <= 1
    assert torch.equal(b[2], b[3])
    with pytest.raises(ValueError, match="out of range"):
        DaliDecoder("cpu").decode(info, [0, 30])  # DALI would pad with blank frames


@pytest.mark.parametrize("codec,ext", [("libvpx-vp9", "webm"), ("libx264", "mp4")])
def test_seeking_decode_equals_sequential_decode(tmp_path, codec, ext):
    path = tmp_path / f"long.{ext}"
    _encode(path, _frames(120, 40, 56, seed=1), 24, codec=codec, gop=10)
    info = probe_video(str(path))
    assert info.total_frames == 120 and len(info.keyframes) > 5
    idx = [3, 35, 36, 80, 119]
    seek = PyAVDecoder().decode(info, idx)
    from dataclasses import replace

    seq = PyAVDecoder().decode(replace(info, frame_pts=None), idx)
    assert torch.equal(seek, seq)
    ref = _reference_all_frames(path)
    for k, i in enumerate(idx):
        assert torch.equal(seek[k], ref[i])


def test_h264_is_served_by_pyav_on_cpu(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = _frames(12, 64, 96)
    write_video(str(path), frames, 8, codec="h264")
    info = probe_video(str(path))
    assert info.codec == "h264"
    decoders = VideoDecoders("auto", "cpu")
    choice = decoders.choose("h264")
    assert (choice.backend, choice.device) == ("pyav", "cpu")
    out = decoders.decoder(choice).decode(info, [0, 11])
    assert out.shape == (2, 3, 64, 96)
    with pytest.raises(ValueError, match="cannot decode h264"):
        VideoDecoders("dali", "cpu").choose("h264")


def test_backend_selection_table():
    assert select_backend("vp9", "auto", "cpu", have_dali=True).backend == "dali"
    assert select_backend("mjpeg", "auto", "cpu", have_dali=True).backend == "dali"
    assert select_backend("h264", "auto", "cpu", have_dali=True).backend == "pyav"
    assert select_backend("hevc", "auto", "cpu", have_dali=True).backend == "pyav"
    gpu = select_backend("h264", "auto", "gpu", have_dali=True)
    assert (gpu.backend, gpu.device) == ("dali", "gpu")
    assert select_backend("vp9", "auto", "cpu", have_dali=False).backend == "pyav"
    assert select_backend("vp9", "pyav", "cpu", have_dali=True).backend == "pyav"
    with pytest.raises(ValueError, match="not installed"):
        select_backend("vp9", "dali", "cpu", have_dali=False)
    with pytest.raises(ValueError):
        select_backend("vp9", "ffmpeg", "cpu")


def test_backend_choice_logged_once(caplog):
    choice = select_backend("vp8", "auto", "cpu", have_dali=True)
    with caplog.at_level(logging.INFO, logger="megatron_ral.data.video.backend"):
        for _ in range(3):
            log_choice_once("vp8", choice)
    lines = [r.getMessage() for r in caplog.records if "vp8" in r.getMessage()]
    assert lines == ["video codec vp8: dali on cpu (DALI decodes vp8 on cpu)"]


@pytest.mark.parametrize("name,codec,pix_fmt", [("clip.avi", "mjpeg", "yuvj420p"), ("clip.mkv", "mjpeg", "yuvj422p"), ("clip.webm", "libvpx", "yuv420p")])
def test_dali_cpu_codecs_mjpeg_vp8_match_pyav(tmp_path, name, codec, pix_fmt):
    path = tmp_path / name
    frames = _frames(12, 50, 70, seed=4)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 70, 50, pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    info = probe_video(str(path))
    assert select_backend(info.codec, "auto", "cpu", have_dali=True).backend == "dali"
    idx = [0, 5, 11]
    a, b = DaliDecoder("cpu").decode(info, idx), PyAVDecoder().decode(info, idx)
    assert (a.int() - b.int()).abs().max().item() <= 1
