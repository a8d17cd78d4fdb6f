"""The report's figures: per-group sensitivity, the size/quality Pareto chart, image grids and,
for videos, frame strips.

Everything is drawn headless (Agg) straight to PNG so the report can be built on a GPU box with
no display.  Chart functions return False instead of drawing an empty or misleading figure when
the records needed are missing; the caller then simply leaves that figure out of the report.

Byte counts are shown in 1000-based (SI) units throughout: 1 KB = 1000 B, 1 MB = 10^6 B,
1 GB = 10^9 B, matching how model sizes are usually quoted.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from layerscan.study import LOWER_IS_BETTER, Criterion  # noqa: E402

if TYPE_CHECKING:  # only named in annotations
    from layerscan.evaluate import TrialRecord
    from layerscan.layers import Group

__all__ = ["format_bytes", "frame_strips", "image_grid", "pareto_chart", "sensitivity_chart",
           "strip_frames"]

DPI = 100
_GRID_PIXELS = 400_000  # image pixels per grid: about 1 MB of PNG at worst
STRIP_FRAMES = 8  # frames shown per clip: evenly spaced, first and last included
_UNITS = ("B", "KB", "MB", "GB", "TB")
_GOOD, _BAD, _MUTED, _FRONT = "#2a9d8f", "#e76f51", "#8d99ae", "#264653"


def format_bytes(n: int) -> str:
    """``n`` bytes with three significant digits in 1000-based units: "1.23 GB", "456 KB".

    A value that would round up to 1000 moves to the next unit ("1.00 MB", never "1000 KB").
    """
    sign, n = ("-" if n < 0 else ""), abs(int(n))
    for i, unit in enumerate(_UNITS):
        value = n / 1000**i
        decimals = 0 if i == 0 or value >= 99.95 else 1 if value >= 9.995 else 2
        text = f"{value:.{decimals}f}"
        if float(text) < 1000 or unit == _UNITS[-1]:
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")


def _axis_unit(largest: float) -> tuple[str, int]:
    """The unit an axis reaching ``largest`` bytes should use, so tiny models get KB, not 0.00 MB."""
    i = 0
    while i < len(_UNITS) - 1 and abs(largest) >= 1000 ** (i + 1):
        i += 1
    return _UNITS[i], 1000**i


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _usable(record: TrialRecord, metric: str) -> bool:
    """Complete FP8 records with a finite value: stopped records average only some prompts."""
    value = record.mean.get(metric)
    return (record.status == "complete" and record.config is not None
            and value is not None and math.isfinite(value))


def _save(fig: plt.Figure, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)  # pyplot keeps every figure alive until closed; a long search makes many


def sensitivity_chart(records: list[TrialRecord], groups: list[Group], criterion: Criterion,
                      path: Path) -> bool:
    """Bar per group: how much keeping only that group in BF16 improves on FP8 everywhere.

    Positive bars are groups worth keeping; the parameter share beside each bar shows what
    keeping it costs.  Where a configuration was evaluated more than once the last record wins.
    """
    metric = criterion.metric
    by_config = {r.config: r for r in records if _usable(r, metric)}
    fp8_all = by_config.get(())
    if fp8_all is None:
        return False
    base = fp8_all.mean[metric]
    sign = -1.0 if LOWER_IS_BETTER[metric] else 1.0
    total_params = sum(g.params for g in groups)
    bars, missing = [], []
    for g in groups:
        record = by_config.get((g.pattern,))
        if record is None:
            missing.append(g.pattern)
        else:
            bars.append((g, sign * (record.mean[metric] - base)))
    if not bars:
        return False
    bars.sort(key=lambda item: item[1], reverse=True)

    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.3 * len(bars)))
    benefits = [b for _, b in bars]
    ax.barh(range(len(bars)), benefits, color=[_GOOD if b > 0 else _BAD for b in benefits])
    ax.set_yticks(range(len(bars)), [_short(g.pattern, 40) for g, _ in bars], fontsize=8)
    ax.invert_yaxis()  # largest benefit on top
    ax.axvline(0, color="black", linewidth=0.8)
    for y, (g, b) in enumerate(bars):
        if total_params > 0:
            ax.annotate(f" {100 * g.params / total_params:.1f}% of params ", (b, y),
                        ha="left" if b >= 0 else "right", va="center", fontsize=7)
    ax.margins(x=0.25)  # room for the annotations at both ends
    ax.set_xlabel(f"{metric}: improvement over FP8 everywhere (FP8 all = {base:.4g})")
    ax.set_title("Keeping one group in BF16", fontsize=10)
    if missing:
        note = _short("not evaluated: " + ", ".join(missing), 120)
        fig.text(0.01, 0.005, note, fontsize=7, color=_MUTED, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if missing else 0, 1, 1))
    _save(fig, path)
    return True


def pareto_chart(records: list[TrialRecord], pareto: list[TrialRecord],
                 recommended: TrialRecord | None, criterion: Criterion, path: Path) -> bool:
    """Quality against extra BF16 bytes for every complete FP8 configuration.

    The step line is the Pareto front read as "best quality reachable within this many bytes";
    the dashed line is the mean threshold, so points and front can be judged against it.
    """
    metric = criterion.metric
    points = [r for r in records if _usable(r, metric)]
    if not points:
        return False
    unit, scale = _axis_unit(max(r.bf16_kept_bytes for r in points))

    def xy(rs: list[TrialRecord]) -> tuple[list[float], list[float]]:
        return [r.bf16_kept_bytes / scale for r in rs], [r.mean[metric] for r in rs]

    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs, ys = xy(points)
    # The 95 % interval of each mean: points whose bars overlap may not differ at all.
    lows = [r.ci.get(metric, (y, y))[0] for r, y in zip(points, ys)]
    highs = [r.ci.get(metric, (y, y))[1] for r, y in zip(points, ys)]
    ax.errorbar(xs, ys, yerr=[[max(0.0, y - lo) for y, lo in zip(ys, lows)],
                              [max(0.0, hi - y) for y, hi in zip(ys, highs)]],
                fmt="none", ecolor=_MUTED, alpha=0.5, linewidth=0.8, zorder=1)
    ax.scatter(xs, ys, s=22, color=_MUTED, alpha=0.7, label="FP8 configuration", zorder=2)
    front = sorted((r for r in pareto if _usable(r, metric)), key=lambda r: r.bf16_kept_bytes)
    if front:
        ax.step(*xy(front), where="post", color=_FRONT, linewidth=1.2, zorder=3)
        ax.scatter(*xy(front), s=40, color=_FRONT, label="Pareto front", zorder=4)
    ax.axhline(criterion.mean_limit, color=_BAD, linestyle="--", linewidth=1, label="criterion (mean)")
    if criterion.floor_mean is not None:
        ax.axhline(criterion.floor_mean, color=_GOOD, linestyle=":", linewidth=1,
                   label="BF16 noise floor (mean)")
    for r in points:
        if r.config == ():
            ax.annotate("FP8 all", (r.bf16_kept_bytes / scale, r.mean[metric]),
                        xytext=(6, -12), textcoords="offset points", fontsize=8)
            break
    if recommended is not None and _usable(recommended, metric):
        (x,), (y,) = xy([recommended])
        ax.scatter([x], [y], marker="*", s=260, color="#e9c46a", edgecolor="black",
                   label="recommended", zorder=5)
        right_half = x > ax.get_xlim()[0] + 0.5 * (ax.get_xlim()[1] - ax.get_xlim()[0])
        ax.annotate(_short(recommended.label, 60), (x, y), xytext=(-8 if right_half else 8, 8),
                    textcoords="offset points", ha="right" if right_half else "left", fontsize=8)
    better = "lower" if LOWER_IS_BETTER[metric] else "higher"
    ax.set_xlabel(f"BF16 weights kept beyond FP8 all ({unit}, 1000-based)")
    ax.set_ylabel(f"{metric} mean ({better} is better)")
    ax.set_title(criterion.describe(), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return True


def image_grid(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], path: Path,
               diff_against: int = 0) -> None:
    """Images side by side per prompt, then |difference| heat maps against one column.

    The heat maps share one colour scale so a column that differs more looks hotter everywhere,
    not just relative to itself.  Column titles come from the first row.
    """
    if not rows or not rows[0][1]:
        raise ValueError("image_grid needs at least one row with one image")
    titles = [title for title, _ in rows[0][1]]
    n = len(titles)
    if any(len(images) != n for _, images in rows):
        raise ValueError("every row of image_grid must have the same number of images")
    if not 0 <= diff_against < n:
        raise ValueError(f"diff_against={diff_against} is not a column index (0..{n - 1})")
    others = [j for j in range(n) if j != diff_against]

    diffs = []
    for prompt, images in rows:
        ref = np.asarray(images[diff_against][1], dtype=np.int16)
        row = []
        for j in others:
            img = np.asarray(images[j][1], dtype=np.int16)
            if img.shape != ref.shape:
                raise ValueError(f"{prompt!r}: {titles[j]!r} is {img.shape}, "
                                 f"{titles[diff_against]!r} is {ref.shape}; cannot diff")
            row.append(np.abs(img - ref).mean(axis=2))
        diffs.append(row)
    vmax = max([1.0] + [float(d.max()) for row in diffs for d in row])

    ncols = n + len(others)
    # Generated images and their noise-like difference maps barely compress (~2 bytes/pixel in a
    # PNG), so cells shrink as the grid grows to keep the file near a fixed pixel budget.
    cell = float(np.clip(math.sqrt(_GRID_PIXELS / (len(rows) * ncols)), 96, 180)) / DPI
    label_w, cbar_w, title_h = 1.7, 0.9 if others else 0.1, 0.45
    width, height = label_w + ncols * cell + cbar_w, title_h + len(rows) * cell + 0.1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=label_w / width, right=1 - cbar_w / width, top=1 - title_h / height,
                        bottom=0.1 / height, wspace=0.04, hspace=0.04)
    cell_px = cell * DPI
    heat = None
    for i, (prompt, images) in enumerate(rows):
        for j, (_, img) in enumerate(images):
            # Upscaled small images keep hard pixel edges; large ones are smoothed when shrunk.
            interp = "nearest" if max(img.shape[:2]) <= cell_px else "antialiased"
            axes[i, j].imshow(img, interpolation=interp)
        for k, d in enumerate(diffs[i]):
            interp = "nearest" if max(d.shape) <= cell_px else "antialiased"
            heat = axes[i, n + k].imshow(d, cmap="magma", vmin=0, vmax=vmax, interpolation=interp)
        label = textwrap.fill(textwrap.shorten(prompt, 40, placeholder="…"), 18)
        axes[i, 0].text(-0.06, 0.5, label, transform=axes[i, 0].transAxes, ha="right",
                        va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    base = _short(titles[diff_against], 14)
    col_titles = [_short(t, 22) for t in titles] + [f"|{_short(titles[j], 14)} − {base}|"
                                                    for j in others]
    for j, title in enumerate(col_titles):
        axes[0, j].set_title(title, fontsize=8)
    if heat is not None:
        top, bottom = 1 - title_h / height, 0.1 / height
        cax = fig.add_axes((1 - (cbar_w - 0.15) / width, bottom, 0.15 / width, top - bottom))
        fig.colorbar(heat, cax=cax).set_label("|difference| (0-255)", fontsize=8)
        cax.tick_params(labelsize=7)
    _save(fig, path)


def strip_frames(count: int, shown: int = STRIP_FRAMES) -> list[int]:
    """Indices of ``shown`` evenly spaced frames of a ``count``-frame clip, first and last
    included (every frame when there are no more than ``shown``)."""
    if count <= shown:
        return list(range(count))
    return sorted({round(i * (count - 1) / (shown - 1)) for i in range(shown)})


def _strip(frames: list[np.ndarray], gap: int, fill: float) -> np.ndarray:
    """Frames side by side with ``gap`` columns of ``fill`` between them."""
    height = frames[0].shape[0]
    spacer = np.full((height, gap) + frames[0].shape[2:], fill, dtype=np.float32)
    pieces = []
    for k, frame in enumerate(frames):
        pieces += ([spacer] if k else []) + [frame.astype(np.float32)]
    return np.concatenate(pieces, axis=1)


def frame_strips(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], path: Path,
                 diff_against: int = 0, shown: int = STRIP_FRAMES) -> None:
    """Videos as rows of frames: per prompt, one strip per column (BF16, FP8 everywhere, the
    recommendation), then one strip of |difference| heat maps per column against ``diff_against``.

    The video counterpart of ``image_grid``, with the same row format (``(prompt, [(title,
    TxHxWx3 video), ...])``): a clip read as a row of frames shows where along it FP8 drifts,
    which one frame cannot.  The heat maps share one colour scale across the figure.
    """
    if not rows or not rows[0][1]:
        raise ValueError("frame_strips needs at least one row with one video")
    titles = [title for title, _ in rows[0][1]]
    n = len(titles)
    if any(len(videos) != n for _, videos in rows):
        raise ValueError("every row of frame_strips must have the same number of videos")
    if not 0 <= diff_against < n:
        raise ValueError(f"diff_against={diff_against} is not a column index (0..{n - 1})")
    others = [j for j in range(n) if j != diff_against]
    reference = np.asarray(rows[0][1][diff_against][1])
    if reference.ndim != 4:
        raise ValueError(f"frame_strips takes TxHxWx3 videos, got shape {reference.shape}")
    picked = strip_frames(reference.shape[0], shown)
    height, width = reference.shape[1:3]
    gap = max(1, width // 16)

    strips: list[tuple[str, np.ndarray, bool]] = []  # (label, strip, is a heat map)
    vmax = 1.0
    for prompt, videos in rows:
        ref = np.asarray(videos[diff_against][1], dtype=np.int16)
        for j, (title, video) in enumerate(videos):
            if np.shape(video) != ref.shape:
                raise ValueError(f"{prompt!r}: {title!r} is {np.shape(video)}, "
                                 f"{titles[diff_against]!r} is {ref.shape}; cannot diff")
            label = (textwrap.fill(textwrap.shorten(prompt, 60, placeholder="…"), 30) + f"\n{title}"
                     if j == 0 else title)
            strips.append((label, _strip([video[t] / 255.0 for t in picked], gap, 1.0), False))
        for j in others:
            diffs = [np.abs(np.asarray(videos[j][1][t], np.int16) - ref[t]).mean(axis=2) for t in picked]
            vmax = max([vmax] + [float(d.max()) for d in diffs])
            strips.append((f"|{_short(titles[j], 14)} − {_short(titles[diff_against], 14)}|",
                           _strip(diffs, gap, np.nan), True))

    # Cells shrink as the figure grows, to keep it near image_grid's pixel budget.
    cell = float(np.clip(math.sqrt(_GRID_PIXELS / (len(strips) * len(picked))), 64, 160)) / DPI
    row_h = cell * height / max(height, width)
    strip_w = cell * len(picked) * width / max(height, width)
    label_w, cbar_w, title_h = 1.9, 0.9, 0.45
    fig_w, fig_h = label_w + strip_w + cbar_w, title_h + len(strips) * (row_h + 0.04) + 0.1
    fig, axes = plt.subplots(len(strips), 1, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=label_w / fig_w, right=1 - cbar_w / fig_w, top=1 - title_h / fig_h,
                        bottom=0.1 / fig_h, hspace=0.04 / row_h)
    cmap = plt.get_cmap("magma").with_extremes(bad="white")  # the gaps between heat maps
    heat = None
    for ax, (label, strip, is_heat) in zip(axes[:, 0], strips):
        interp = "nearest" if strip.shape[0] <= row_h * DPI else "antialiased"
        if is_heat:
            heat = ax.imshow(strip, cmap=cmap, vmin=0, vmax=vmax, interpolation=interp)
        else:
            ax.imshow(np.clip(strip, 0.0, 1.0), interpolation=interp)
        ax.set_axis_off()
        ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=7)
    count = reference.shape[0]
    axes[0, 0].set_title(f"frames {', '.join(str(t) for t in picked)} of {count}", fontsize=8)
    if heat is not None:
        top, bottom = 1 - title_h / fig_h, 0.1 / fig_h
        cax = fig.add_axes((1 - (cbar_w - 0.15) / fig_w, bottom, 0.15 / fig_w, top - bottom))
        fig.colorbar(heat, cax=cax).set_label("|difference| (0-255)", fontsize=8)
        cax.tick_params(labelsize=7)
    _save(fig, path)
