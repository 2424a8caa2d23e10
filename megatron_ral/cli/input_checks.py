"""Checks of the tools' inputs that run before anything heavy is loaded; each failure is one
:class:`~megatron_ral.errors.UsageError` line naming the flag and the value.

Paths (inputs exist, outputs can be written), media (a video demuxes, an image decodes its header), JSON
files, numbers (sampling values, counts) and the process layout (TP x PP against the launcher's process
count and the model's layers and heads). Nothing here imports torch; media checks import PyAV / PIL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from megatron_ral.errors import UsageError


# --- paths -------------------------------------------------------------------------------------------

def input_file(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise UsageError(f"{flag} {path}: not a regular file")
    return p


def input_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: not a directory")
    return p


def _writable_ancestor(p: Path, flag: str, shown: str) -> None:
    """The nearest existing ancestor of ``p`` must be a writable directory (the rest gets created)."""
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {shown}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {shown}: directory {anc} is not writable")


def output_file(path: str, flag: str = "--out") -> Path:
    """A file the tool will write: its directory must exist and be writable; it must not be a directory."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory (give a file name)")
    parent = p.absolute().parent
    if not parent.exists():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    _writable_ancestor(p, flag, path)
    return p


def output_dir(path: str, flag: str = "--out", overwrite: bool = False) -> Path:
    """A directory the tool will create: absent or empty (unless ``overwrite``), under a writable directory."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if not overwrite and any(p.iterdir()):
            raise UsageError(f"{flag} {path}: exists and is not empty (--overwrite replaces it)")
    _writable_ancestor(p, flag, path)
    return p


def write_file_atomically(path: str | os.PathLike, flag: str, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; on any failure nothing is left at either name."""
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_file(path: str, flag: str) -> Any:
    """The parsed content of a JSON file, or one line saying why it is not one."""
    p = input_file(path, flag)
    raw = p.read_bytes()
    if not raw.strip():
        raise UsageError(f"{flag} {path}: empty file (expected JSON)")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e})") from None


def json_text(text: str, flag: str) -> Any:
    """The parsed content of JSON given on the command line, or one line saying why it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: not valid JSON text ({e})") from None


# --- media -------------------------------------------------------------------------------------------

def video_file(path: str, flag: str = "--video") -> None:
    """The file exists, is not empty, and its first video stream demuxes completely (PyAV, no decode)."""
    from megatron_ral.data.errors import MediaError
    from megatron_ral.data.video.probe import probe_video

    try:
        probe_video(path)
    except MediaError as e:
        raise UsageError(f"{flag} {path}: {e.detail} ({e.reason})") from None


def image_file(path: str, flag: str = "--image") -> None:
    """The file exists, is not empty, and PIL recognises and verifies it."""
    from PIL import Image

    from megatron_ral.data.errors import MediaError
    from megatron_ral.data.video.probe import check_file

    try:
        check_file(path)
    except MediaError as e:
        raise UsageError(f"{flag} {path}: {e.detail} ({e.reason})") from None
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise UsageError(f"{flag} {path}: not a readable image ({type(e).__name__}: {e})") from None


def media_files(image: str | None, video: str | None) -> None:
    if image is not None:
        image_file(image, "--image")
    if video is not None:
        video_file(video, "--video")


# --- numbers -----------------------------------------------------------------------------------------

def at_least(value: float, lowest: float, flag: str) -> None:
    if value < lowest:
        raise UsageError(f"{flag} {value}: must be >= {lowest}")


def fraction(value: float, flag: str, *, open_low: bool = False) -> None:
    ok = (0 < value <= 1) if open_low else (0 <= value <= 1)
    if not ok:
        raise UsageError(f"{flag} {value}: must be in {'(0, 1]' if open_low else '[0, 1]'}")


def sampling(*, greedy: bool, temperature: float | None, top_p: float | None, top_k: int | None,
             max_new_tokens: int) -> None:
    """Sampling flags: --greedy excludes the others; temperature >= 0, top-p in (0, 1], top-k >= 0."""
    given = [f for f, v in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k)) if v is not None]
    if greedy and given:
        raise UsageError(f"--greedy excludes {' / '.join(given)}")
    if temperature is not None:
        at_least(temperature, 0, "--temperature")
    if top_p is not None:
        fraction(top_p, "--top-p", open_low=True)
    if top_k is not None:
        at_least(top_k, 0, "--top-k")
    at_least(max_new_tokens, 1, "--max-new-tokens")


# --- process layout ----------------------------------------------------------------------------------

def parse_pp_split(text: str | None, pp: int) -> list[int] | None:
    if text is None:
        return None
    try:
        split = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--pp-split {text!r}: expected comma-separated integers") from None
    if len(split) != pp or min(split) < 1:
        raise UsageError(f"--pp-split {text}: need one positive layer count per pipeline stage ({pp})")
    return split


def process_count(tp: int, pp: int, cp: int = 1) -> None:
    """--tp/--pp (/--cp) against the launcher's process count: one process per model-parallel rank (TP x PP x CP)."""
    from megatron_ral.platform.launch_env import rank_and_world

    if tp < 1 or pp < 1:
        raise UsageError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if cp < 1:
        raise UsageError(f"--cp must be >= 1, got --cp {cp}")
    world = rank_and_world()[1]
    n = tp * pp * cp
    if world != n:
        launch = f"torchrun --nproc-per-node {n}" if n > 1 else "it as a single process"
        shown = f"--tp {tp} x --pp {pp}" + (f" x --cp {cp}" if cp > 1 else "")
        raise UsageError(f"{world} process(es) but {shown} = {n}; run {launch}")


def layout(tp: int, pp: int, pp_split: str | None, *, num_layers: int | None = None,
           num_heads: int | None = None, num_kv_heads: int | None = None, cp: int = 1) -> list[int] | None:
    """Check --tp/--pp/--pp-split (/--cp) against the process count and the model's sizes; return the parsed
    split (None: even)."""
    process_count(tp, pp, cp)
    split = parse_pp_split(pp_split, pp)
    if num_heads is not None and num_heads % tp:
        raise UsageError(f"--tp {tp}: must divide the model's {num_heads} attention heads")
    if num_kv_heads is not None and num_kv_heads % tp:
        raise UsageError(f"--tp {tp}: must divide the model's {num_kv_heads} key/value heads")
    if num_layers is not None:
        if pp > num_layers:
            raise UsageError(f"--pp {pp}: the model has only {num_layers} layers")
        if split is not None and sum(split) != num_layers:
            raise UsageError(f"--pp-split {pp_split}: sums to {sum(split)}, the model has {num_layers} layers")
    return split


def not_inside(out: str, source: Path, flag: str) -> None:
    """--out must neither be the input, nor lie inside it, nor contain it (--overwrite would delete it)."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UsageError(f"--out {out}: must not be {flag}, inside it or around it")
