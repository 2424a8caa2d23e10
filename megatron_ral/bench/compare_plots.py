"""The comparison's pictures: curves.png (reward and held-out accuracy per arm, mean with a band over seeds)
and attention.png (attention mass on vision tokens per arm).

``line_panels`` and ``bar_panel`` are the only drawing calls: with matplotlib installed they use it; without
it a small PIL renderer draws the same content (axes, lines, bands, bars, legend), so the files exist on a
core install. When the project's shared plotting module lands these two functions point at it.
"""

from __future__ import annotations

import math

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def band(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean, std) over seeds at the x values every curve has."""
    common = sorted(set.intersection(*[{x for x, _ in c} for c in curves])) if curves else []
    out = []
    for x in common:
        ys = [dict(c)[x] for c in curves]
        m = sum(ys) / len(ys)
        s = math.sqrt(sum((y - m) ** 2 for y in ys) / (len(ys) - 1)) if len(ys) > 1 else 0.0
        out.append((x, m, s))
    return out


def line_panels(path: str, panels: list[tuple[str, dict[str, list[tuple[float, float, float]]]]]) -> None:
    """Side-by-side panels, each (title, {label: [(x, mean, std), ...]}), mean lines with ±std bands."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_lines(path, panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    for ax, (title, series) in zip(axes if len(panels) > 1 else [axes], panels):
        for i, (label, pts) in enumerate(series.items()):
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            c = tuple(v / 255 for v in PALETTE[i % len(PALETTE)])
            ax.plot(xs, ms, label=label, color=c)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=c, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar_panel(path: str, title: str, values: dict[str, tuple[float, float]]) -> None:
    """One bar per label (mean) with a ±std whisker."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_bars(path, title, values)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(values), 3) + 2, 4))
    labels = list(values)
    ax.bar(labels, [values[k][0] for k in labels], yerr=[values[k][1] for k in labels], capsize=4,
           color=[tuple(v / 255 for v in PALETTE[i % len(PALETTE)]) for i in range(len(labels))])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ PIL fallback
W, H, M = 520, 360, 48


def _frame(draw, ox: int, title: str, lo: float, hi: float, xmax: float) -> None:
    draw.rectangle([ox + M, M, ox + W - 16, H - M], outline=(0, 0, 0))
    draw.text((ox + M, 16), title, fill=(0, 0, 0))
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = H - M - (H - 2 * M) * k / 4
        draw.text((ox + 4, y - 6), f"{v:.2f}", fill=(0, 0, 0))
    draw.text((ox + W - 60, H - M + 8), f"step {xmax:g}", fill=(0, 0, 0))


def _pil_lines(path: str, panels) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W * len(panels), H + 20 * 4), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels):
        ox = p * W
        pts_all = [pt for pts in series.values() for pt in pts]
        if not pts_all:
            continue
        lo = min(m - s for _, m, s in pts_all)
        hi = max(m + s for _, m, s in pts_all)
        hi = hi if hi > lo else lo + 1.0
        xmax = max(x for x, _, _ in pts_all) or 1.0
        _frame(draw, ox, title, lo, hi, xmax)

        def xy(x, y):
            return (ox + M + (W - 16 - M) * x / xmax, H - M - (H - 2 * M) * (y - lo) / (hi - lo))

        for i, (label, pts) in enumerate(series.items()):  # every band first, then every line over them
            col = PALETTE[i % len(PALETTE)]
            light = tuple(int(c + (255 - c) * 0.75) for c in col)
            if len(pts) > 1:
                poly = [xy(x, m + s) for x, m, s in pts] + [xy(x, m - s) for x, m, s in reversed(pts)]
                draw.polygon(poly, fill=light)
        for i, (label, pts) in enumerate(series.items()):
            col = PALETTE[i % len(PALETTE)]
            for a, b in zip(pts, pts[1:]):
                draw.line([xy(a[0], a[1]), xy(b[0], b[1])], fill=col, width=2)
            for x, m, _ in pts:
                cx, cy = xy(x, m)
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=col)
            draw.text((ox + M + 120 * (i % 3), H + 4 + 18 * (i // 3)), f"-- {label}", fill=col)
    img.save(path)


def _pil_bars(path: str, title: str, values: dict[str, tuple[float, float]]) -> None:
    from PIL import Image, ImageDraw

    width = max(W, 90 * len(values) + 2 * M)
    img = Image.new("RGB", (width, H + 30), "white")
    draw = ImageDraw.Draw(img)
    vals = [v for v in values.values() if v and v[0] is not None]
    hi = max([m + s for m, s in vals] + [1e-9])
    draw.text((M, 16), title, fill=(0, 0, 0))
    draw.rectangle([M, M, width - 16, H - M], outline=(0, 0, 0))
    for k in range(5):
        draw.text((4, H - M - (H - 2 * M) * k / 4 - 6), f"{hi * k / 4:.3f}", fill=(0, 0, 0))
    step = (width - 16 - M) / max(len(values), 1)
    for i, (label, v) in enumerate(values.items()):
        x0 = M + step * i + step * 0.2
        draw.text((x0, H - M + 8), label, fill=(0, 0, 0))
        if not v or v[0] is None:
            continue
        m, s = v
        col = PALETTE[i % len(PALETTE)]
        y = H - M - (H - 2 * M) * m / hi
        draw.rectangle([x0, y, x0 + step * 0.6, H - M], fill=col)
        yl, yh = H - M - (H - 2 * M) * (m - s) / hi, H - M - (H - 2 * M) * (m + s) / hi
        xc = x0 + step * 0.3
        draw.line([(xc, yl), (xc, yh)], fill=(0, 0, 0), width=2)
    img.save(path)
