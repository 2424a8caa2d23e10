"""A small synthetic Video-R1-format dataset: coloured shapes that move, appear or change colour.

Every question needs the pixels (the colour at the end, the direction of motion, how many shapes
appear, which colour comes after which); the answer classes are few and the visual cues large, so a
tiny model can learn them. Records carry `process` rationales for SFT. Videos and images are
written under `out/videos` and `out/images`; records under `out/train.json` and `out/test.json`
(held-out split) with paths relative to `out`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
BACKGROUND = (128, 128, 128)
DIRECTIONS = ("left", "right", "up", "down")
LETTERS = "ABCD"
CODECS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}


@dataclass(frozen=True)
class SyntheticSpec:
    height: int = 64
    width: int = 96
    video_fps: int = 8
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    image_fraction: float = 0.25
    heldout_fraction: float = 0.1


def write_video(path: str, frames: np.ndarray, fps: int, codec: str = "vp9") -> None:
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) to `path` with PyAV."""
    import av

    encoder = CODECS[codec][0]
    t, h, w, _ = frames.shape
    with av.open(path, "w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "vp9":
            stream.options = {"crf": "20", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "0"}
        else:
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _canvas(spec: SyntheticSpec, n: int) -> np.ndarray:
    frames = np.empty((n, spec.height, spec.width, 3), np.uint8)
    frames[:] = BACKGROUND
    return frames


def _square(frame: np.ndarray, y: int, x: int, size: int, color: tuple) -> None:
    frame[max(y, 0) : y + size, max(x, 0) : x + size] = color


def _mc(options: list[str], answer: str) -> tuple[list[str], str]:
    return [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)], LETTERS[options.index(answer)]


def _num_frames(rng: np.random.Generator, spec: SyntheticSpec) -> int:
    seconds = rng.uniform(spec.min_seconds, spec.max_seconds)
    return max(2, int(round(seconds * spec.video_fps)))


def task_color_end(rng, spec):
    n = _num_frames(rng, spec)
    c1, c2 = rng.choice(list(COLORS), size=2, replace=False)
    change = int(rng.integers(n // 4, 3 * n // 4 + 1))
    frames = _canvas(spec, n)
    size = spec.height // 2
    y, x = (spec.height - size) // 2, (spec.width - size) // 2
    for i in range(n):
        _square(frames[i], y, x, size, COLORS[c1 if i < change else c2])
    options = list(COLORS)
    opts, letter = _mc(options, c2)
    t_change = change / spec.video_fps
    process = (
        f"<think>The square in the middle is {c1} at the start. Around {t_change:.1f} seconds it turns {c2} "
        f"and it stays {c2} until the last frame. So at the end the square is {c2}, which is option {letter}.</think>"
    )
    return frames, "What colour is the square at the end of the video?", "multiple choice", opts, letter, process


def task_direction(rng, spec):
    n = _num_frames(rng, spec)
    direction = DIRECTIONS[int(rng.integers(4))]
    color = rng.choice(list(COLORS))
    size = spec.height // 4
    frames = _canvas(spec, n)
    cy, cx = (spec.height - size) // 2, (spec.width - size) // 2
    span_x, span_y = spec.width - size, spec.height - size
    for i in range(n):
        a = i / max(n - 1, 1)
        y, x = cy, cx
        if direction == "left":
            x = int(round((1 - a) * span_x))
        elif direction == "right":
            x = int(round(a * span_x))
        elif direction == "up":
            y = int(round((1 - a) * span_y))
        else:
            y = int(round(a * span_y))
        _square(frames[i], y, x, size, COLORS[color])
    opts, letter = _mc(list(DIRECTIONS), direction)
    start = {"left": "right edge", "right": "left edge", "up": "bottom", "down": "top"}[direction]
    end = {"left": "left edge", "right": "right edge", "up": "top", "down": "bottom"}[direction]
    process = (
        f"<think>The {color} square starts near the {start} of the frame and ends near the {end}. "
        f"It keeps moving {direction} the whole time, so the answer is option {letter}.</think>"
    )
    return frames, f"In which direction does the {color} square move?", "multiple choice", opts, letter, process


def task_count(rng, spec):
    n = _num_frames(rng, spec)
    count = int(rng.integers(1, 5))
    frames = _canvas(spec, n)
    size = spec.height // 4
    slots = [(y, x) for y in (spec.height // 8, spec.height // 2 + spec.height // 8) for x in (spec.width // 8, spec.width // 2 + spec.width // 8)]
    order = rng.permutation(len(slots))[:count]
    colors = rng.choice(list(COLORS), size=count)
    appear = sorted(int(v) for v in rng.integers(0, max(n - 2, 1), size=count))
    for k in range(count):
        y, x = slots[order[k]]
        for i in range(appear[k], n):
            _square(frames[i], y, x, size, COLORS[colors[k]])
    times = ", ".join(f"{appear[k] / spec.video_fps:.1f}s" for k in range(count))
    noun = "square" if count == 1 else "squares"
    process = (
        f"<think>I count the squares as they appear: new ones show up at {times}. "
        f"No square disappears, and the last frame shows {count} {noun}. So {count} {noun} appear in total.</think>"
    )
    return frames, "How many squares appear in the video in total?", "numerical", [], str(count), process


def task_after(rng, spec):
    n = max(_num_frames(rng, spec), 8)
    seq = list(rng.choice(list(COLORS), size=3, replace=False))
    frames = _canvas(spec, n)
    size = spec.height // 2
    y, x = (spec.height - size) // 2, (spec.width - size) // 2
    bounds = [0, n // 3, 2 * n // 3, n]
    for k, c in enumerate(seq):
        for i in range(bounds[k], bounds[k + 1]):
            _square(frames[i], y, x, size, COLORS[c])
    k = int(rng.integers(0, 2))
    opts, letter = _mc(list(COLORS), seq[k + 1])
    process = (
        f"<think>The square is shown in a sequence of colours: {seq[0]}, then {seq[1]}, then {seq[2]}. "
        f"Right after {seq[k]} comes {seq[k + 1]}, which is option {letter}.</think>"
    )
    return frames, f"Which colour does the square show right after {seq[k]}?", "multiple choice", opts, letter, process


def image_color(rng, spec):
    color = rng.choice(list(COLORS))
    img = _canvas(spec, 1)[0]
    size = spec.height // 2
    _square(img, int(rng.integers(0, spec.height - size)), int(rng.integers(0, spec.width - size)), size, COLORS[color])
    opts, letter = _mc(list(COLORS), color)
    process = f"<think>There is one square in the image and it is {color}. That is option {letter}.</think>"
    return img, "What colour is the square?", "multiple choice", opts, letter, process


def image_count(rng, spec):
    count = int(rng.integers(1, 5))
    img = _canvas(spec, 1)[0]
    size = spec.height // 4
    slots = [(y, x) for y in (spec.height // 8, spec.height // 2 + spec.height // 8) for x in (spec.width // 8, spec.width // 2 + spec.width // 8)]
    for k in rng.permutation(len(slots))[:count]:
        _square(img, *slots[k], size, COLORS[rng.choice(list(COLORS))])
    noun = "square" if count == 1 else "squares"
    process = f"<think>I look at each corner region of the image and find a square in {count} of them, so there {'is' if count == 1 else 'are'} {count} {noun}.</think>"
    return img, "How many squares are in the image?", "numerical", [], str(count), process


def task_brief_small(rng, spec):
    """The colour of a small square shown only in the middle third of the video, beside two large squares of
    two other colours that stay the whole time: the answer is in a small region during a short moment, so
    attending to the right vision tokens is what separates right from wrong (the large squares' colours are
    wrong options)."""
    n = max(_num_frames(rng, spec), 6)
    target, d1, d2 = (str(c) for c in rng.choice(list(COLORS), size=3, replace=False))
    frames = _canvas(spec, n)
    big, small = spec.height // 3, max(spec.height // 6, 4)
    half = spec.width // 2
    # large distractors at the left and right edges, the small target somewhere in the middle band
    for i in range(n):
        _square(frames[i], spec.height // 8, 0, big, COLORS[d1])
        _square(frames[i], spec.height - spec.height // 8 - big, spec.width - big, big, COLORS[d2])
    y = int(rng.integers(0, spec.height - small))
    x = int(rng.integers(big, max(spec.width - big - small, big + 1)))
    start, stop = n // 3, max(2 * n // 3, n // 3 + 1)
    for i in range(start, stop):
        _square(frames[i], y, x, small, COLORS[target])
    opts, letter = _mc(list(COLORS), target)
    side = "left" if x + small // 2 < half else "right"
    process = (
        f"<think>Two large squares, {d1} and {d2}, stay at the edges the whole time. Between "
        f"{start / spec.video_fps:.1f}s and {stop / spec.video_fps:.1f}s a small square appears on the {side} "
        f"side; it is {target}. So the answer is option {letter}.</think>"
    )
    return frames, "What colour is the small square that appears only for a moment?", "multiple choice", opts, letter, process


VIDEO_TASKS = (task_color_end, task_direction, task_count, task_after)
IMAGE_TASKS = (image_color, image_count)
# Opt-in tasks (make_synthetic_dataset(tasks=...)): not in the default mix, whose records and bytes stay fixed.
EXTRA_VIDEO_TASKS = (task_brief_small,)
TASKS = {f.__name__: f for f in VIDEO_TASKS + IMAGE_TASKS + EXTRA_VIDEO_TASKS}
DEFAULT_TASKS = tuple(f.__name__ for f in VIDEO_TASKS + IMAGE_TASKS)


def resolve_tasks(names) -> tuple[tuple, tuple]:
    """(video tasks, image tasks) for a list of task names ("default" stands for the default mix)."""
    chosen: list = []
    for name in names:
        for n in (DEFAULT_TASKS if name == "default" else (name,)):
            if n not in TASKS:
                raise ValueError(f"unknown synthetic task {n!r}; known: default, {', '.join(sorted(TASKS))}")
            if TASKS[n] not in chosen:
                chosen.append(TASKS[n])
    if not chosen:
        raise ValueError("no synthetic task chosen")
    return tuple(f for f in chosen if f not in IMAGE_TASKS), tuple(f for f in chosen if f in IMAGE_TASKS)


def make_synthetic_dataset(out_dir: str, n: int, codec: str = "vp9", seed: int = 0, spec: SyntheticSpec | None = None,
                           tasks=None) -> dict:
    """Write `n` records (videos + an image subset) under `out_dir`; return a summary dict.

    tasks: None = the default mix (VIDEO_TASKS + IMAGE_TASKS, the records of every earlier version); or task
    names (see TASKS; "default" = the default mix): each record is an image with probability
    spec.image_fraction when both kinds are chosen, then a uniform draw among the chosen tasks of its kind.
    Every record's ``data_source`` is ``synthetic/<task name>``."""
    from PIL import Image

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    spec = spec or SyntheticSpec()
    if spec.height % 2 or spec.width % 2:
        raise ValueError("synthetic video sizes must be even (yuv420p)")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    ext = CODECS[codec][1]
    video_tasks, image_tasks = (VIDEO_TASKS, IMAGE_TASKS) if tasks is None else resolve_tasks(tasks)
    records = []
    for i in range(n):
        is_image = rng.random() < spec.image_fraction
        if not image_tasks or not video_tasks:
            is_image = bool(image_tasks)
        kind = image_tasks if is_image else video_tasks
        task = kind[int(rng.integers(len(kind)))]
        media, problem, ptype, options, answer, process = task(rng, spec)
        if is_image:
            rel = f"images/{i:06d}.png"
            Image.fromarray(media).save(os.path.join(out_dir, rel))
        else:
            rel = f"videos/{i:06d}.{ext}"
            write_video(os.path.join(out_dir, rel), media, spec.video_fps, codec)
        records.append(
            {
                "problem_id": i,
                "problem": problem,
                "data_type": "image" if is_image else "video",
                "problem_type": ptype,
                "options": options,
                "process": process,
                "solution": f"<answer>{answer}</answer>",
                "path": rel,
                "data_source": f"synthetic/{task.__name__}",
            }
        )
    n_test = int(round(n * spec.heldout_fraction)) if n > 1 else 0
    if spec.heldout_fraction > 0 and n >= 10:
        n_test = max(n_test, 1)
    test_ids = set(rng.permutation(n)[:n_test].tolist())
    train = [r for r in records if r["problem_id"] not in test_ids]
    test = [r for r in records if r["problem_id"] in test_ids]
    for name, recs in (("train.json", train), ("test.json", test)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(recs, f, indent=1)
    return {
        "out": out_dir,
        "train": os.path.join(out_dir, "train.json"),
        "test": os.path.join(out_dir, "test.json"),
        "num_train": len(train),
        "num_test": len(test),
        "num_images": sum(r["data_type"] == "image" for r in records),
        "num_videos": sum(r["data_type"] == "video" for r in records),
        "codec": codec,
    }
