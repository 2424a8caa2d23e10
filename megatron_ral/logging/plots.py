"""PNG pictures of a run and of where a model attends: the one plotting module of the project.

    plot_curves(path, {"ral": rows, ...})            training curves from metrics.jsonl rows (one line per run)
    plot_frame_bars(path, masses, labels, ...)       attention mass per video frame, bars over time
    plot_patch_overlays(path, frames, heats, ...)    a heatmap over the image patches on each frame
    plot_bands(path, [(title, {label: [(x, mean, std)]})])   mean lines with a ±std band (runs over seeds)
    plot_bars(path, title, {label: (mean, std)})     one bar per label with a ±std whisker

Used by tools/visualize_attention.py, the quickstart's ``curves.png`` and the comparison experiment's
pictures. matplotlib (the ``[plot]`` extra) is imported on first use with the Agg backend (no display);
inputs are plain numbers / numpy arrays. Every picture is written at a fixed size (``size_px``), so a
figure's pixel size is known in advance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

DPI = 100
# metrics.jsonl key -> panel title of the training curves
CURVES = {"reward/total": "reward (total)", "eval/accuracy": "held-out accuracy",
          "attn/jsd_old": "attention JSD to the old policy", "attn/vision_mass": "attention mass on vision tokens"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from megatron_ral.errors import UserError

        raise UserError("pictures need matplotlib: pip install -e '.[plot]' (or MEGATRON_RAL_EXTRAS=...,plot "
                        "bash scripts/setup.sh)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def size_px(width_in: float, height_in: float) -> tuple[int, int]:
    """Pixel size (width, height) of a picture of that many inches."""
    return round(width_in * DPI), round(height_in * DPI)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_curves(path: str | os.PathLike, runs: Mapping[str, Sequence[Mapping]], keys: Mapping[str, str] = CURVES,
                title: str = "") -> Path:
    """One panel per metric key that some run logged (x: step), one line per run. Panels 5 x 3.2 inches,
    two per row."""
    plt = _pyplot()
    present = [k for k in keys if any(k in r for rows in runs.values() for r in rows)]
    if not present:
        raise ValueError(f"none of {list(keys)} is in the metrics")
    ncols = min(2, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=name)
        ax.set_title(keys[key], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_frame_bars(path: str | os.PathLike, masses: Sequence[float], labels: Sequence[str], title: str = "",
                    ylabel: str = "attention mass") -> Path:
    """Bars of ``masses`` over ``labels`` (one per frame, in time order); 8 x 3.5 inches."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = list(range(len(masses)))
    ax.bar(xs, list(masses), color="tab:blue")
    ax.set_xticks(xs)
    ax.set_xticklabels(list(labels), rotation=45 if len(xs) > 8 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("frame (start time)")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_patch_overlays(path: str | os.PathLike, frames: Sequence, heats: Sequence, titles: Sequence[str],
                        suptitle: str = "", columns: int = 4) -> Path:
    """Each frame (H, W, 3) uint8 with its heat (h, w) stretched over it (semi-transparent, one colour scale
    for all frames); 3 x 2.6 inches per panel, ``columns`` per row."""
    import numpy as np

    plt = _pyplot()
    n = len(frames)
    ncols = max(1, min(columns, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 2.6 * nrows), squeeze=False)
    top = max(float(np.max(h)) for h in heats) if n else 1.0
    image = None
    for ax, frame, heat, title in zip(axes.flat, frames, heats, titles):
        height, width = frame.shape[:2]
        ax.imshow(frame, extent=(0, width, height, 0))
        image = ax.imshow(np.asarray(heat, dtype=float), cmap="inferno", alpha=0.55, vmin=0.0, vmax=top or 1.0,
                          extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="attention mass per patch")
    return _save(fig, path)


__all__ = ["CURVES", "DPI", "plot_curves", "plot_frame_bars", "plot_patch_overlays", "size_px"]


def plot_bands(path: str | os.PathLike, panels: Sequence[tuple[str, Mapping[str, Sequence[tuple]]]],
               xlabel: str = "step") -> Path:
    """Side-by-side panels, each (title, {label: [(x, mean, std), ...]}): the mean as a line, mean ± std as
    a band (e.g. one arm's runs over seeds); 6 x 4 inches per panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for label, pts in series.items():
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            (line,) = ax.plot(xs, ms, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(path: str | os.PathLike, title: str, values: Mapping[str, tuple[float, float] | None]) -> Path:
    """One bar per label at its mean with a ±std whisker; a label whose value is None is drawn empty
    (marked "n/a"). 1.2 inches per bar + 2, by 4 inches."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(labels), 3) + 2, 4))
    xs = list(range(len(labels)))
    means = [values[k][0] if values[k] is not None else 0.0 for k in labels]
    stds = [values[k][1] if values[k] is not None else 0.0 for k in labels]
    colors = [f"C{i % 10}" for i in xs]
    ax.bar(xs, means, yerr=stds, capsize=4, color=colors)
    for x, k in zip(xs, labels):
        if values[k] is None:
            ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 5 else 0, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
