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

Normalised Y'CbCr here: Y' in [0, 1], Cb and Cr in [-1/2, 1/2]; RGB in [0, 1] before the final
``round(255 x)`` and clamp to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


def _apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m (3, 3) applied to the channel axis 1 of x (T, 3, H, W)."""
    return torch.einsum("ij,tjhw->tihw", m.to(device=x.device, dtype=x.dtype), x)


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def ycbcr_to_rgb(ycbcr: torch.Tensor, matrix: str) -> torch.Tensor:
    """The shared step: normalised Y'CbCr float (T, 3, H, W) -> uint8 RGB (T, 3, H, W) with ``matrix``."""
    return _to_uint8(_apply(_coefficients(matrix), ycbcr.float()))


def _upsample(plane: torch.Tensor, size: int, dim: int, cosited: bool) -> torch.Tensor:
    """Bilinear resampling of ``plane`` along ``dim`` to ``size`` samples, edges replicated. The n input
    samples are stretched over the ``size`` outputs (an odd luma size has ceil(size/2) chroma samples, as
    in FFmpeg's converter); ``cosited``: input sample i sits on output i * size / n, else at the centre of
    the outputs it covers."""
    n = plane.shape[dim]
    if n == size:
        return plane
    x = torch.arange(size, dtype=torch.float64, device=plane.device)
    pos = x * (n / size) if cosited else (x + 0.5) * (n / size) - 0.5
    pos = pos.clamp_(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_(max=n - 1)
    shape = [1] * plane.dim()
    shape[dim] = size
    w = (pos - lo).to(plane.dtype).view(shape)
    return plane.index_select(dim, lo) * (1 - w) + plane.index_select(dim, hi) * w


def normalise_planes(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, full_range: bool,
                     chroma_siting: str = "center") -> torch.Tensor:
    """uint8 planes (T, H, W) / (T, h, w) -> normalised float (T, 3, H, W), the chroma upsampled
    bilinearly to the luma size (4:2:0, 4:2:2, 4:4:4, ...) from where ``chroma_siting`` puts it: "center"
    both ways, or "left" (co-sited horizontally, centred vertically)."""
    height, width = y.shape[-2:]
    chroma = torch.stack([cb, cr], dim=1).float()
    chroma = _upsample(chroma, height, 2, cosited=False)
    chroma = _upsample(chroma, width, 3, cosited=chroma_siting == "left")
    yf = y.float()[:, None]
    if full_range:
        return torch.cat([yf / 255.0, (chroma - 128.0) / 255.0], dim=1)
    return torch.cat([(yf - 16.0) / 219.0, (chroma - 128.0) / 224.0], dim=1)


def planes_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, spec: ColourSpec) -> torch.Tensor:
    """uint8 planes of T frames -> uint8 RGB (T, 3, H, W) with the stream's matrix and range."""
    return ycbcr_to_rgb(normalise_planes(y, cb, cr, spec.full_range, spec.chroma_siting), spec.matrix)


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


def dali_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """Undo DALI's fixed BT.601 conversion: uint8 RGB (T, 3, H, W) -> normalised Y'CbCr float (exact
    inverse of the matrix; the range is the stream's in both, so it cancels)."""
    inverse = torch.linalg.inv(_coefficients(DALI_MATRIX))
    return _apply(inverse, rgb.float() / 255.0)


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
        part = rgb[start : start + CHUNK]
        out[start : start + CHUNK] = ycbcr_to_rgb(dali_to_ycbcr(part), spec.matrix)
    return out
