"""The shared YUV -> RGB step against FFmpeg's own conversion, on real H.264 and VP9 clips.

- Clips tagged BT.709 or BT.601 (SMPTE 170M), limited or full range (Y'CbCr written by FFmpeg from RGB with
  that matrix and range): the probe reads the tags, and the PyAV decoder's torch conversion of the planes
  equals FFmpeg's conversion with that matrix and range (swscale, bilinear full chroma interpolation,
  accurate rounding) within 1 level, while the other matrix is visibly different.
- Untagged: BT.601 below HD and BT.709 from HD (the documented difference from FFmpeg, which takes every
  untagged stream as BT.601), or BT.601 throughout with data.video_untagged_matrix=bt601.
- DALI: its output (fixed BT.601) is left alone for BT.601 streams and agrees with PyAV within 1 level;
  for a BT.709 stream `rematrix` undoes the fixed matrix: within 1 level of FFmpeg's BT.709 conversion
  wherever DALI did not clip (colours inside BT.601's RGB cube). On the CPU, `auto` sends such a stream to
  PyAV (exact); on the GPU DALI stays.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace, Interpolation

from megatron_ral.data.video.backend import select_backend
from megatron_ral.data.video.colour import ColourSpec, resolve_colour, rematrix
from megatron_ral.data.video.dali_backend import DaliDecoder
from megatron_ral.data.video.probe import probe_video
from megatron_ral.data.video.pyav_backend import PyAVDecoder

FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
SWS = {"bt709": Colorspace.ITU709, "bt601": Colorspace.ITU601}
AVCOL = {"bt709": 1, "bt601": 6}  # AVCOL_SPC_BT709, AVCOL_SPC_SMPTE170M
CODECS = {"h264": ("libx264", "mp4"), "vp9": ("libvpx-vp9", "webm")}


def _content(t, h, w, saturation=1.0, seed=0):
    """Smooth gradients, a moving square and noise: RGB uint8 (t, h, w, 3); ``saturation`` < 1 pulls
    every colour towards grey."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.float64)
    for i in range(t):
        out[i, ..., 0] = xx * 255 / (w - 1)
        out[i, ..., 1] = yy * 255 / (h - 1)
        out[i, ..., 2] = (i * 40 + xx + yy) % 256
        x0 = (5 * i) % (w - 12)
        out[i, 4:16, x0:x0 + 12] = (230, 30, 40)
    out += rng.normal(0, 6, out.shape)
    out = 128 + saturation * (out - 128)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _encode(path, rgb, codec, matrix=None, full_range=False, fps=8):
    """Encode RGB frames as yuv420p with FFmpeg's RGB -> Y'CbCr conversion for ``matrix`` (BT.601 when
    None) and range, tagging the stream (untagged when ``matrix`` is None)."""
    encoder, _ = CODECS[codec]
    t, h, w, _ = rgb.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream(encoder, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if matrix is not None:
            s.codec_context.colorspace = AVCOL[matrix]
            s.codec_context.color_range = 2 if full_range else 1
        s.options = ({"crf": "18", "b:v": "0", "deadline": "realtime", "cpu-used": "8"} if codec == "vp9"
                     else {"preset": "ultrafast", "crf": "12"})
        for f in rgb:
            frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=SWS[matrix or "bt601"],
                dst_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG)
            if matrix is not None:
                frame.colorspace, frame.color_range = AVCOL[matrix], 2 if full_range else 1
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _ffmpeg_rgb(path, indices, matrix, full_range, flags=FLAGS):
    """FFmpeg's conversion of the decoded frames with an explicit matrix and range: uint8 (n, 3, H, W)."""
    out = {}
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in indices:
                kw = {} if flags is None else {"interpolation": flags}
                rgb = f.reformat(format="rgb24", src_colorspace=SWS[matrix],
                                 src_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG, **kw)
                out[i] = torch.from_numpy(rgb.to_ndarray()).permute(2, 0, 1)
    return torch.stack([out[i] for i in indices])


def _diff(a, b):
    return (a.int() - b.int()).abs()


@pytest.mark.parametrize("codec", ["h264", "vp9"])
@pytest.mark.parametrize("matrix", ["bt709", "bt601"])
@pytest.mark.parametrize("full_range", [False, True], ids=["limited", "full"])
def test_tagged_clips_convert_as_ffmpeg_does(tmp_path, codec, matrix, full_range):
    path = tmp_path / f"clip.{CODECS[codec][1]}"
    _encode(path, _content(6, 48, 64), codec, matrix, full_range)
    info = probe_video(str(path))
    assert info.colour == ColourSpec(matrix, full_range, True, "left" if codec == "h264" else "center")
    idx = [0, 3, 5]
    ours = PyAVDecoder().decode(info, idx)
    ref = _ffmpeg_rgb(path, idx, matrix, full_range)
    assert _diff(ours, ref).max().item() <= 1
    other = "bt601" if matrix == "bt709" else "bt709"
    assert _diff(ours, _ffmpeg_rgb(path, idx, other, full_range)).max().item() >= 10  # the matrix matters
    other_range = PyAVDecoder().decode(replace_colour(info, matrix, not full_range), idx)
    assert _diff(ours, other_range).max().item() >= 10  # and the range
    if codec == "vp9":  # DALI decodes VP9 on the CPU too
        if matrix == "bt601":
            dali = DaliDecoder("cpu").decode(info, idx)
            assert _diff(dali, ours).max().item() <= 1
        choice = select_backend("vp9", "auto", "cpu", have_dali=True, colour=info.colour)
        assert choice.backend == ("dali" if matrix == "bt601" else "pyav")
        assert select_backend("vp9", "auto", "gpu", have_dali=True, colour=info.colour).backend == "dali"


@pytest.mark.parametrize("full_range", [False, True], ids=["limited", "full"])
def test_rematrix_undoes_dali_fixed_bt601_conversion(tmp_path, full_range):
    """DALI (here its CPU decoder; the GPU kernel uses the same fixed matrix) on a BT.709 stream."""
    path = tmp_path / "bt709.webm"
    _encode(path, _content(6, 48, 64, saturation=0.45), "vp9", "bt709", full_range)
    info = probe_video(str(path))
    idx = [1, 4]
    fixed = DaliDecoder("cpu").decode(info, idx)   # goes through rematrix
    as601 = DaliDecoder("cpu").decode(replace_colour(info, "bt601"), idx)  # DALI's own output, untouched
    ref = _ffmpeg_rgb(path, idx, "bt709", full_range)
    assert _diff(as601, _ffmpeg_rgb(path, idx, "bt601", full_range)).max().item() <= 1  # what DALI does
    assert _diff(as601, ref).max().item() >= 10
    assert _diff(fixed, ref).max().item() <= 1
    assert torch.equal(rematrix(as601, info.colour), fixed)
    assert torch.equal(rematrix(as601, replace_colour(info, "bt601").colour), as601)  # nothing to undo


def replace_colour(info, matrix, full_range=None):
    from dataclasses import replace

    full = info.colour.full_range if full_range is None else full_range
    return replace(info, colour=replace(info.colour, matrix=matrix, full_range=full))


@pytest.mark.parametrize("rule,expected", [("auto", "bt709"), ("bt601", "bt601")])
def test_untagged_hd_clip(tmp_path, rule, expected):
    path = tmp_path / "hd.mp4"
    _encode(path, _content(2, 720, 1280), "h264", matrix=None)
    info = probe_video(str(path), untagged_matrix=rule)
    assert info.colour == ColourSpec(expected, False, False, "left")
    ours = PyAVDecoder().decode(info, [1])
    assert _diff(ours, _ffmpeg_rgb(path, [1], expected, False)).max().item() <= 1
    # FFmpeg's converter takes the untagged stream as BT.601: "auto" differs from it, "bt601" does not
    other = "bt601" if expected == "bt709" else "bt709"
    assert _diff(ours, _ffmpeg_rgb(path, [1], other, False)).max().item() >= 10


@pytest.mark.parametrize("tags,size,pix_fmt,rule,expected", [
    ((2, 0), (640, 480), "yuv420p", "auto", ("bt601", False)),      # untagged SD
    ((2, 0), (1024, 576), "yuv420p", "auto", ("bt601", False)),     # PAL SD is still SD
    ((2, 0), (1280, 720), "yuv420p", "auto", ("bt709", False)),     # untagged HD
    ((2, 0), (1280, 544), "yuv420p", "auto", ("bt709", False)),     # cinema-scope HD: by width
    ((2, 0), (1920, 1080), "yuvj420p", "auto", ("bt601", True)),    # JPEG (MJPEG): BT.601, full range
    ((2, 0), (1920, 1080), "yuv420p", "bt601", ("bt601", False)),   # FFmpeg's convention
    ((2, 0), (640, 480), "yuv420p", "bt709", ("bt709", False)),
    ((1, 2), (640, 480), "yuv420p", "auto", ("bt709", True)),       # a tag wins over the size rule
    ((5, 1), (1920, 1080), "yuv420p", "auto", ("bt601", False)),    # BT.470BG
    ((9, 1), (3840, 2160), "yuv420p10le", "auto", ("bt2020", False)),
    ((8, 0), (1920, 1080), "yuv420p", "auto", ("bt709", False)),    # YCgCo is not a matrix here: size rule
])
def test_resolve_colour(tags, size, pix_fmt, rule, expected):
    spec = resolve_colour(*tags, pix_fmt, *size, untagged=rule)
    assert (spec.matrix, spec.full_range) == expected
    assert spec.tagged == (tags[0] in (1, 5, 9))
