"""YUV -> RGB: one explicit conversion with the stream's own matrix and range, shared by both decoders.

A video stores luma/chroma (Y'CbCr) samples; which matrix turns them into RGB, and whether they use the
limited (Y 16-235, C 16-240) or the full (0-255) range, is a property of the stream (its tags). The
decoders get the samples in two ways:

- PyAV (FFmpeg) hands over the Y, Cb, Cr planes. :func:`planes_to_rgb` normalises them with the
  stream's range, upsamples the chroma bilinearly to the luma grid where the codec sites it (FFmpeg's
  decoders' defaults: "left", co-sited with the even luma columns and centred between rows, for
  H.264/HEVC/MPEG-2/MPEG-4 Part 2; "center" of the luma block it covers for VP8/VP9/AV1/MJPEG; edges
  replicated, the geometry FFmpeg's converter uses with full chroma interpolation) and converts with
  :func:`ycbcr_to_rgb`.
- DALI returns RGB only, converted with a fixed BT.601 matrix (its GPU kernel and its CPU decoder alike;
  the range is honoured), after the same centre-sited bilinear chroma upsampling. :func:`rematrix` undoes
  that matrix exactly (a linear map in float) and converts with :func:`ycbcr_to_rgb`; nothing is done when
  the stream's matrix is BT.601. What DALI clipped to [0, 255] cannot be undone: colours a BT.709 stream
  holds outside BT.601's RGB cube (saturated and very dark or bright colours) stay off; and DALI's GPU
  kernel centres the chroma of H.264/HEVC streams too (half a chroma sample off at sharp colour edges).
  README, "Video decoding", gives the size of both.

The matrix of a stream (:func:`resolve_colour`): its tag (BT.709, BT.601 = BT.470BG / SMPTE 170M,
BT.2020 non-constant luminance, SMPTE 240M, FCC); untagged, BT.601 for SD and BT.709 for HD (width >= 1280
or height > 576, the rule players such as ffplay/SDL and mpv use), BT.601 for JPEG-range (yuvj) streams.
FFmpeg's own converter (swscale, and so torchvision's and decord's readers) takes untagged streams as
BT.601 whatever their size: ``data.video_untagged_matrix=bt601`` reproduces that. The range: its tag;
untagged, full for yuvj pixel formats and limited otherwise.

Normalised Y'CbCr: Y' in [0, 1], Cb and Cr in [-1/2, 1/2] (from 8-bit levels: (Y - 16) / 219 and
(C - 128) / 224 in limited range, Y / 255 and (C - 128) / 255 in full range); RGB in [0, 1] before the
final ``round(255 x)`` and clamp to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# (Kr, Kb) of each matrix: Y' = Kr R + (1 - Kr - Kb) G + Kb B.
MATRICES: dict[str, tuple[float, float]] = {
    "bt601": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
    "bt2020": (0.2627, 0.0593),
    "smpte240m": (0.212, 0.087),
    "fcc": (0.30, 0.11),
}
# FFmpeg's AVColorSpace codes (libavutil/pixfmt.h) of the matrices above.
AVCOL_SPC = {1: "bt709", 4: "fcc", 5: "bt601", 6: "bt601", 7: "smpte240m", 9: "bt2020"}
AVCOL_RANGE_MPEG, AVCOL_RANGE_JPEG = 1, 2
UNTAGGED_RULES = ("auto", "bt601", "bt709")
# Codecs whose FFmpeg decoders site 4:2:0 chroma "left" (the MPEG-2 convention, their default when the
# stream does not signal it); every other codec is taken as "center".
LEFT_SITED_CODECS = frozenset({"h264", "hevc", "vvc", "mpeg2video", "mpeg4"})
# DALI's video decoder converts with BT.601 whatever the stream says.
DALI_MATRIX = "bt601"
# Frames converted per torch call (bounds the float temporaries).
CHUNK = 16


@dataclass(frozen=True)
class ColourSpec:
    """How a stream's Y'CbCr samples map to RGB. ``tagged``: the matrix came from the stream's tag
    (False: chosen by the untagged rule). ``chroma_siting``: "center" or "left" (see the module doc)."""

    matrix: str = "bt601"
    full_range: bool = False
    tagged: bool = False
    chroma_siting: str = "center"

    def __post_init__(self):
        if self.matrix not in MATRICES:
            raise ValueError(f"unknown YUV matrix {self.matrix!r}; known: {', '.join(MATRICES)}")
        if self.chroma_siting not in ("center", "left"):
            raise ValueError(f"chroma siting must be 'center' or 'left', got {self.chroma_siting!r}")

    def describe(self) -> str:
        return (f"{self.matrix} {'full' if self.full_range else 'limited'} range{'' if self.tagged else ' (untagged)'}, "
                f"{self.chroma_siting}-sited chroma")


def is_hd(width: int, height: int) -> bool:
    return width >= 1280 or height > 576


def resolve_colour(colorspace: int | None, color_range: int | None, pix_fmt: str | None, width: int, height: int,
                   untagged: str = "auto", codec: str | None = None) -> ColourSpec:
    """The ColourSpec of a stream from FFmpeg's tags (``AVColorSpace`` and ``AVColorRange`` codes, pixel
    format name, frame size) and its codec (the chroma siting). ``untagged``: "auto" (SD BT.601 / HD
    BT.709), "bt601" or "bt709"."""
    if untagged not in UNTAGGED_RULES:
        raise ValueError(f"data.video_untagged_matrix must be one of {', '.join(UNTAGGED_RULES)}, got {untagged!r}")
    jpeg = bool(pix_fmt) and pix_fmt.startswith("yuvj")
    if color_range == AVCOL_RANGE_JPEG:
        full = True
    elif color_range == AVCOL_RANGE_MPEG:
        full = False
    else:
        full = jpeg
    siting = "left" if codec in LEFT_SITED_CODECS else "center"
    matrix = AVCOL_SPC.get(int(colorspace)) if colorspace is not None else None
    if matrix is not None:
        return ColourSpec(matrix, full, True, siting)
    if untagged == "auto":
        untagged = "bt709" if is_hd(width, height) and not jpeg else "bt601"
    return ColourSpec(untagged, full, False, siting)


def _coefficients(matrix: str) -> torch.Tensor:
    """3x3 float64 matrix taking normalised (Y', Cb, Cr) to (R, G, B)."""
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    return torch.tensor([
        [1.0, 0.0, 2.0 * (1.0 - kr)],
        [1.0, -2.0 * kb * (1.0 - kb) / kg, -2.0 * kr * (1.0 - kr) / kg],
        [1.0, 2.0 * (1.0 - kb), 0.0],
    ], dtype=torch.float64)


def _range(full_range: bool) -> tuple[float, float, float]:
    """(luma offset, luma scale, chroma scale) from 8-bit sample levels to normalised Y'CbCr."""
    return (0.0, 1.0 / 255.0, 1.0 / 255.0) if full_range else (16.0, 1.0 / 219.0, 1.0 / 224.0)


def ycbcr_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, matrix: str, full_range: bool) -> torch.Tensor:
    """The shared step. Y'CbCr samples in 8-bit levels, float (T, H, W) each (chroma already at the luma
    size) -> uint8 RGB (T, 3, H, W), with the range's normalisation and the matrix folded into one affine
    map per channel: R = Y' + 2(1 - Kr) Cr,  B = Y' + 2(1 - Kb) Cb,  G = (Y' - Kr R - Kb B) / Kg on
    normalised values, then round(255 x), clamped."""
    m = (_coefficients(matrix) * 255.0).tolist()
    y0, sy, sc = _range(full_range)
    out = torch.empty((y.shape[0], 3, *y.shape[1:]), dtype=torch.float32, device=y.device)
    luma = y.float().mul(sy * 255.0)
    for c in range(3):
        a_cb, a_cr = m[c][1] * sc, m[c][2] * sc
        # the offsets: luma black level, chroma zero at 128, and +0.5 to round half up on truncation
        bias = -y0 * sy * 255.0 - 128.0 * (a_cb + a_cr) + 0.5
        channel = out[:, c]
        torch.add(luma, cr, alpha=a_cr, out=channel) if a_cr else channel.copy_(luma)
        if a_cb:
            channel.add_(cb, alpha=a_cb)
        channel.add_(bias)
    return out.clamp_(0.0, 255.0).to(torch.uint8)


def _upsample(chroma: torch.Tensor, height: int, width: int, left: bool) -> torch.Tensor:
    """Bilinear upsampling of chroma (T, 2, h, w) to the luma size, edges replicated. Vertically (and
    horizontally unless ``left``) each sample sits at the centre of the luma pixels it covers, the h
    samples stretched over the ``height`` rows (an odd luma size has ceil(size/2) chroma samples; FFmpeg's
    converter does the same). ``left``: horizontally sample i sits on luma column i * width / w."""
    h, w = chroma.shape[-2:]
    if not left:
        if (h, w) == (height, width):
            return chroma
        return F.interpolate(chroma, size=(height, width), mode="bilinear", align_corners=False)
    if h != height:
        chroma = F.interpolate(chroma, size=(height, w), mode="bilinear", align_corners=False)
    if w == width:
        return chroma
    factor = -(-width // w)          # 2 for 4:2:0 / 4:2:2
    cosited = (w - 1) * factor + 1   # columns 0 .. last sample, with sample i on column i * factor
    out = F.interpolate(chroma, size=(height, cosited), mode="bilinear", align_corners=True)
    if cosited < width:              # columns right of the last sample repeat it
        out = torch.cat([out, out[..., -1:].expand(*out.shape[:-1], width - cosited)], dim=-1)
    return out[..., :width]


def upsample_chroma(cb: torch.Tensor, cr: torch.Tensor, height: int, width: int,
                    chroma_siting: str = "center") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 chroma planes (T, h, w) -> float (T, H, W) each, upsampled bilinearly to the luma size (4:2:0,
    4:2:2, 4:4:4, ...) from where ``chroma_siting`` puts them: "center" both ways, or "left" (co-sited
    horizontally, centred vertically)."""
    up = _upsample(torch.stack([cb, cr], dim=1).float(), height, width, chroma_siting == "left")
    return up[:, 0], up[:, 1]


def planes_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, spec: ColourSpec) -> torch.Tensor:
    """uint8 planes of T frames -> uint8 RGB (T, 3, H, W) with the stream's matrix, range and siting."""
    cb_up, cr_up = upsample_chroma(cb, cr, *y.shape[-2:], spec.chroma_siting)
    return ycbcr_to_rgb(y, cb_up, cr_up, spec.matrix, spec.full_range)


# 8-bit planar Y'CbCr formats whose planes are used as they are
PLANAR_8BIT = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
                         "yuv411p", "yuvj411p", "yuv410p"})


def frame_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, Cb, Cr) uint8 arrays of a PyAV frame; other formats (10/12-bit, NV12, gray, ...) are first
    brought to 8-bit yuv444p by FFmpeg, a Y'CbCr -> Y'CbCr step with the same tags (no matrix involved;
    a 10-bit source then lands within 3 levels of FFmpeg's own RGB instead of 1)."""
    name = frame.format.name
    if name not in PLANAR_8BIT:
        frame = frame.reformat(format="yuvj444p" if name.startswith("yuvj") else "yuv444p")
    out = []
    for plane in frame.planes[:3]:
        rows = np.frombuffer(plane, dtype=np.uint8, count=plane.height * plane.line_size)
        rows = rows.reshape(plane.height, plane.line_size)
        out.append(rows[:, : plane.width].copy())
    return out[0], out[1], out[2]


def dali_to_ycbcr(rgb: torch.Tensor, full_range: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo DALI's fixed BT.601 conversion: uint8 RGB (T, 3, H, W) -> Y'CbCr in 8-bit levels, float
    (T, H, W) each, with the stream's range (which DALI honours): the exact inverse of the matrix."""
    inverse = torch.linalg.inv(_coefficients(DALI_MATRIX)).to(device=rgb.device, dtype=torch.float32)
    ycc = torch.einsum("ij,tjhw->tihw", inverse, rgb.float().div_(255.0))
    y0, sy, sc = _range(full_range)
    return ycc[:, 0].div_(sy).add_(y0), ycc[:, 1].div_(sc).add_(128.0), ycc[:, 2].div_(sc).add_(128.0)


def rematrix(rgb: torch.Tensor, spec: ColourSpec, decoded_with: str = DALI_MATRIX) -> torch.Tensor:
    """uint8 RGB that a decoder converted with the fixed ``decoded_with`` matrix -> the stream's own
    matrix, through the shared :func:`ycbcr_to_rgb`. Unchanged when the two matrices agree. Works in
    chunks of ``CHUNK`` frames on the frames' device."""
    if spec.matrix == decoded_with:
        return rgb
    if decoded_with != DALI_MATRIX:
        raise ValueError(f"only DALI's fixed {DALI_MATRIX} conversion is undone, not {decoded_with!r}")
    out = torch.empty_like(rgb)
    for start in range(0, rgb.shape[0], CHUNK):
        y, cb, cr = dali_to_ycbcr(rgb[start : start + CHUNK], spec.full_range)
        out[start : start + CHUNK] = ycbcr_to_rgb(y, cb, cr, spec.matrix, spec.full_range)
    return out
