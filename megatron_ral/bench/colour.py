"""How far the decoders' RGB is from FFmpeg's, in 8-bit levels (tools/bench/colour.py; README figures).

Clips are written here with PyAV: textured gradients with a moving saturated square (``benchmark.make_clips``
content), Y'CbCr produced by FFmpeg from RGB with the matrix and range each clip is tagged with. Reported,
as max / mean absolute difference and the share of values that differ (``frac_ne``) or differ by more than
one level (``frac_gt1``):

- ``shared_vs_ffmpeg_tagged``: PyAV + the shared torch step against FFmpeg's conversion with the tagged
  matrix and range (bilinear full chroma interpolation, accurate rounding), H.264 and VP9, BT.601 / BT.709,
  limited / full;
- ``shared_vs_ffmpeg_default``: against FFmpeg's default conversion (``frame.to_ndarray(format="rgb24")``:
  chroma replicated, untagged streams taken as BT.601), the frames torchvision's and decord's readers give;
- ``dali_cpu_vs_pyav``: DALI's CPU decoder against PyAV on BT.601 VP9 (where DALI's output is used as is);
- ``dali_rematrix_vs_ffmpeg``: DALI's fixed-BT.601 output undone by ``colour.rematrix`` on BT.709 VP9,
  against FFmpeg's BT.709 conversion, for content inside BT.601's RGB cube and for the full content;
- ``rgb_cube_outside_bt601``: share of the 8-bit RGB cube (64 steps per channel) whose BT.709 limited-range
  Y'CbCr DALI's BT.601 conversion clips, and the largest resulting error (computed, no decoder);
- ``gpu_chroma_siting_h264``: centre-sited (DALI's GPU kernel) against left-sited (FFmpeg, the codec's
  default) chroma on H.264, both through the shared step (computed on the CPU; the GPU kernel is not run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace

import numpy as np
import torch

SIZE = (360, 640)


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.int() - b.int()).abs().float()
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4), "p99": float(d.flatten().quantile(0.99)),
            "frac_ne": round(float((d > 0).float().mean()), 5), "frac_gt1": round(float((d > 1).float().mean()), 5)}


def _merge(rows: list[dict]) -> dict:
    return {"max": max(r["max"] for r in rows), "mean": round(float(np.mean([r["mean"] for r in rows])), 4),
            "p99": max(r["p99"] for r in rows), "frac_ne": round(float(np.mean([r["frac_ne"] for r in rows])), 5),
            "frac_gt1": round(float(np.mean([r["frac_gt1"] for r in rows])), 5)}


def _content(t: int, height: int, width: int, saturation: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    texture = rng.integers(0, 60, size=(height, width, 1))
    out = np.empty((t, height, width, 3), np.float64)
    side = max(height // 5, 8)
    for i in range(t):
        out[i, ..., 0] = xx * 255 // width
        out[i, ..., 1] = yy * 255 // height
        out[i, ..., 2] = (i * 4 + 40) % 256
        out[i] += texture
        x = int((i * 7) % (width - side))
        out[i, height // 3: height // 3 + side, x: x + side] = (230, 40, 40)
    out = 128 + saturation * (np.clip(out, 0, 255) - 128)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _write(path: str, rgb: np.ndarray, codec: str, matrix: str | None, full_range: bool) -> str:
    import av
    from av.video.reformatter import ColorRange, Colorspace

    encoder = {"h264": "libx264", "vp9": "libvpx-vp9"}[codec]
    sws = {"bt709": Colorspace.ITU709, "bt601": Colorspace.ITU601, None: Colorspace.ITU601}[matrix]
    tag = {"bt709": 1, "bt601": 6}.get(matrix)
    t, h, w, _ = rgb.shape
    with av.open(path, "w") as c:
        s = c.add_stream(encoder, rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if tag is not None:
            s.codec_context.colorspace, s.codec_context.color_range = tag, 2 if full_range else 1
        s.options = ({"crf": "20", "b:v": "0", "deadline": "realtime", "cpu-used": "8"} if codec == "vp9"
                     else {"preset": "ultrafast", "crf": "16"})
        for f in rgb:
            frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=sws, dst_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG)
            if tag is not None:
                frame.colorspace, frame.color_range = tag, 2 if full_range else 1
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _ffmpeg(path: str, indices: list[int], matrix: str | None = None, full_range: bool = False) -> torch.Tensor:
    """FFmpeg's RGB: with an explicit matrix/range and full chroma interpolation, or (matrix None) its default."""
    import av
    from av.video.reformatter import ColorRange, Colorspace, Interpolation

    flags = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
    out = {}
    with av.open(path) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i not in indices:
                continue
            if matrix is None:
                rgb = f.to_ndarray(format="rgb24")
            else:
                rgb = f.reformat(format="rgb24", interpolation=flags,
                                 src_colorspace={"bt709": Colorspace.ITU709, "bt601": Colorspace.ITU601}[matrix],
                                 src_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG).to_ndarray()
            out[i] = torch.from_numpy(rgb).permute(2, 0, 1)
    return torch.stack([out[i] for i in indices])


def rgb_cube_outside_bt601(steps: int = 64) -> dict:
    """Share of the RGB cube whose BT.709 limited-range Y'CbCr leaves [0, 255] under a BT.601 decode, and
    the error left after undoing the BT.601 matrix (computed)."""
    from megatron_ral.data.video.colour import (
        ColourSpec,
        _coefficients,
        rematrix,
        ycbcr_to_rgb,
    )

    v = torch.linspace(0, 1, steps, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, -1)
    ycc = torch.linalg.inv(_coefficients("bt709")) @ rgb                      # normalised Y'CbCr
    levels = torch.stack([torch.round(16 + 219 * ycc[0]), torch.round(128 + 224 * ycc[1:])[0],
                          torch.round(128 + 224 * ycc[1:])[1]])                 # 8-bit limited-range samples
    normalised = torch.stack([(levels[0] - 16) / 219, (levels[1] - 128) / 224, (levels[2] - 128) / 224])
    as601 = (_coefficients("bt601") @ normalised) * 255
    outside = ((as601.round() < 0) | (as601.round() > 255)).any(dim=0)
    y, cb, cr = (t.reshape(1, 1, -1).float() for t in levels)
    truth = ycbcr_to_rgb(y, cb, cr, "bt709", False)
    back = rematrix(ycbcr_to_rgb(y, cb, cr, "bt601", False), ColourSpec("bt709"))  # DALI's output, undone
    err = (back.int() - truth.int()).abs().amax(dim=1)
    return {"frac_outside": round(float(outside.float().mean()), 4), "max_error": int(err.max()),
            "frac_error_gt1": round(float((err > 1).float().mean()), 4)}


def run_colour_benchmark(out_dir: str, frames: int = 4, size: tuple[int, int] = SIZE) -> dict:
    """The figures listed in the module docstring, for clips of ``frames`` frames of ``size`` (h, w)."""
    import av

    from megatron_ral.data.video.colour import frame_planes, planes_to_rgb
    from megatron_ral.data.video.dali_backend import DaliDecoder
    from megatron_ral.data.video.probe import probe_video
    from megatron_ral.data.video.pyav_backend import PyAVDecoder

    os.makedirs(out_dir, exist_ok=True)
    h, w = size
    rgb = _content(frames, h, w)
    idx = list(range(frames))
    tagged, default, dali_vs_pyav = [], [], []
    for codec in ("h264", "vp9"):
        for matrix in ("bt601", "bt709"):
            for full in (False, True):
                ext = "mp4" if codec == "h264" else "webm"
                path = _write(os.path.join(out_dir, f"{codec}_{matrix}_{'full' if full else 'limited'}.{ext}"),
                              rgb, codec, matrix, full)
                info = probe_video(path)
                ours = PyAVDecoder().decode(info, idx)
                tagged.append(_stats(ours, _ffmpeg(path, idx, matrix, full)))
                default.append(_stats(ours, _ffmpeg(path, idx)))
                if codec == "vp9" and matrix == "bt601":
                    dali_vs_pyav.append(_stats(DaliDecoder("cpu").decode(info, idx), ours))
    untagged = {}
    for name, (hh, ww, codec) in {"sd_640x360_vp9": (h, w, "vp9"), "hd_1280x720_h264": (720, 1280, "h264")}.items():
        path = _write(os.path.join(out_dir, f"untagged_{name}.{'mp4' if codec == 'h264' else 'webm'}"),
                      _content(2, hh, ww), codec, None, False)
        info = probe_video(path)
        untagged[name] = {"matrix_auto": info.colour.matrix,
                          "vs_ffmpeg_default": _stats(PyAVDecoder().decode(info, [0, 1]), _ffmpeg(path, [0, 1]))}
    rematrixed = {}
    for label, sat in (("inside_bt601_cube", 0.45), ("full_content", 1.0)):
        rows = []
        for full in (False, True):
            path = _write(os.path.join(out_dir, f"dali_bt709_{label}_{full}.webm"), _content(frames, h, w, sat),
                          "vp9", "bt709", full)
            rows.append(_stats(DaliDecoder("cpu").decode(probe_video(path), idx), _ffmpeg(path, idx, "bt709", full)))
        rematrixed[label] = _merge(rows)
    path = os.path.join(out_dir, "h264_bt709_limited.mp4")
    info = probe_video(path)
    with av.open(path) as c:
        planes = [frame_planes(f) for f in c.decode(video=0)]
    centre, left = [], []
    for y, cb, cr in planes:
        y, cb, cr = (torch.from_numpy(p)[None] for p in (y, cb, cr))
        centre.append(planes_to_rgb(y, cb, cr, replace(info.colour, chroma_siting="center")))
        left.append(planes_to_rgb(y, cb, cr, info.colour))
    return {
        "size": f"{w}x{h}", "frames": frames,
        "shared_vs_ffmpeg_tagged": _merge(tagged),
        "shared_vs_ffmpeg_default": {"tagged_clips": _merge(default), **untagged},
        "dali_cpu_vs_pyav": _merge(dali_vs_pyav),
        "dali_rematrix_vs_ffmpeg": rematrixed,
        "rgb_cube_outside_bt601": rgb_cube_outside_bt601(),
        "gpu_chroma_siting_h264": _stats(torch.cat(centre), torch.cat(left)),
    }


# --- the command (tools/bench/colour.py) ----------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for the generated clips (default: a temp dir)")
    p.add_argument("--frames", type=int, default=4, help="frames per clip")
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the tagged clips (the untagged HD clip is 1280x720)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = args.out or os.path.join(tempfile.gettempdir(), "megatron_ral_colour_bench")
    print(json.dumps(run_colour_benchmark(out, frames=args.frames, size=(height, width))))
    return 0


def cli() -> None:
    """``python tools/bench/colour.py`` and ``python -m megatron_ral.bench.colour``."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
