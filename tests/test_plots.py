"""Tests for layerscan.report.plots: real PNGs written to tmp_path and read back with PIL.

Pixel colours stand in for reading the chart: the sensitivity bars are drawn in one colour when
keeping a group helps and another when it hurts, so counting those colours checks the sign logic
for lower-is-better and higher-is-better metrics without parsing text out of an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerscan.evaluate import TrialRecord
from layerscan.layers import Group
from layerscan.report import plots
from layerscan.report.plots import format_bytes, image_grid, pareto_chart, sensitivity_chart
from layerscan.study import Criterion

LPIPS = Criterion("lpips", 0.05, 0.10)
PSNR = Criterion("psnr", 30.0, 25.0)
GOOD = (42, 157, 143)  # plots._GOOD
BAD = (231, 111, 81)  # plots._BAD


def record(config, lpips: float, nbytes: int = 0, status: str = "complete") -> TrialRecord:
    """A record whose PSNR moves opposite to LPIPS, as real quality metrics do."""
    psnr = 40.0 - 100.0 * lpips
    return TrialRecord(config, status, mean={"lpips": lpips, "psnr": psnr},
                       worst={"lpips": 1.5 * lpips, "psnr": psnr - 3.0}, bf16_kept_bytes=nbytes)


def group(pattern: str, params: int) -> Group:
    return Group(pattern, "family", (f"transformer_blocks.0.{pattern}",), params)


GROUPS = [group("to_qkv", 3000), group("img_mlp", 8000), group("txt_mlp", 8000),
          group("to_out", 1000)]


def png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.convert("RGB")


def colour_count(im: Image.Image, rgb: tuple[int, int, int]) -> int:
    return int(np.all(np.asarray(im) == rgb, axis=2).sum())


def runs(mask: np.ndarray, min_len: int = 1) -> int:
    """Number of runs of True at least ``min_len`` long in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int(((ends - starts) >= min_len).sum())


def bar_count(im: Image.Image) -> int:
    """Bars of the sensitivity chart: runs of pixel rows that contain a bar colour."""
    px = np.asarray(im)
    is_bar = np.all(px == GOOD, axis=2) | np.all(px == BAD, axis=2)
    return runs(is_bar.sum(axis=1) >= 3)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (12_345, "12.3 KB"), (456_000, "456 KB"),
    (999_999, "1.00 MB"), (1_234_567_890, "1.23 GB"), (-1_500_000, "-1.50 MB"),
    (2 * 10**15, "2000 TB"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_axis_unit_suits_tiny_and_large_models() -> None:
    assert plots._axis_unit(22_000) == ("KB", 1000)
    assert plots._axis_unit(3_500_000_000) == ("GB", 10**9)
    assert plots._axis_unit(0) == ("B", 1)


def test_sensitivity_chart_writes_png_and_grows_with_groups(tmp_path: Path) -> None:
    records = [record((), 0.08), record(("to_qkv",), 0.05), record(("img_mlp",), 0.03),
               record(("to_out",), 0.081), record(None, 0.0)]
    assert sensitivity_chart(records[:3], GROUPS, LPIPS, tmp_path / "two.png")
    assert sensitivity_chart(records, GROUPS, LPIPS, tmp_path / "three.png")
    two, three = png(tmp_path / "two.png"), png(tmp_path / "three.png")
    assert 500 <= two.width <= 2000 and 150 <= two.height <= 2000
    assert three.height > two.height
    assert (bar_count(two), bar_count(three)) == (2, 3)  # one bar per evaluated group


@pytest.mark.parametrize("criterion", [LPIPS, PSNR])
def test_sensitivity_sign_follows_metric_direction(tmp_path: Path, criterion: Criterion) -> None:
    helps = [record((), 0.08), record(("to_qkv",), 0.02), record(("img_mlp",), 0.04)]
    hurts = [record((), 0.08), record(("to_qkv",), 0.12), record(("img_mlp",), 0.10)]
    assert sensitivity_chart(helps, GROUPS, criterion, tmp_path / "helps.png")
    assert sensitivity_chart(hurts, GROUPS, criterion, tmp_path / "hurts.png")
    helps_im, hurts_im = png(tmp_path / "helps.png"), png(tmp_path / "hurts.png")
    assert colour_count(helps_im, GOOD) > 500 and colour_count(helps_im, BAD) == 0
    assert colour_count(hurts_im, BAD) > 500 and colour_count(hurts_im, GOOD) == 0


def test_sensitivity_chart_needs_fp8_all_and_a_single_group(tmp_path: Path) -> None:
    out = tmp_path / "s.png"
    no_fp8_all = [record(("to_qkv",), 0.05), record((), 0.08, status="failed")]
    no_single = [record((), 0.08), record(("img_mlp", "to_qkv"), 0.02),
                 record(("to_out",), 0.05, status="stopped")]
    assert sensitivity_chart(no_fp8_all, GROUPS, LPIPS, out) is False
    assert sensitivity_chart(no_single, GROUPS, LPIPS, out) is False
    assert sensitivity_chart([], GROUPS, LPIPS, out) is False
    assert not out.exists()


def test_pareto_chart_writes_png(tmp_path: Path) -> None:
    records = [record((), 0.08), record(("to_qkv",), 0.05, 6000), record(("img_mlp",), 0.03, 16000),
               record(("txt_mlp",), 0.07, 16000), record(("img_mlp", "to_qkv"), 0.02, 22000),
               record(None, 0.0), record(("to_out",), 0.5, 2000, status="failed")]
    front = [records[0], records[1], records[2], records[4]]
    assert pareto_chart(records, front, records[2], LPIPS, tmp_path / "p.png")
    assert pareto_chart(records, [], None, PSNR, tmp_path / "bare.png")
    for name in ("p.png", "bare.png"):
        im = png(tmp_path / name)
        assert 500 <= im.width <= 2000 and 300 <= im.height <= 2000
    star = (233, 196, 106)  # the recommended point's fill, plots' "#e9c46a"
    assert colour_count(png(tmp_path / "p.png"), star) > 50
    assert colour_count(png(tmp_path / "bare.png"), star) == 0


def test_pareto_chart_false_without_plottable_points(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    unplottable = [record(None, 0.0), record(("to_qkv",), 0.05, 6000, status="failed"),
                   record(("img_mlp",), 0.03, 16000, status="stopped"),
                   TrialRecord(("to_out",), "complete", mean={"psnr": 31.0}, bf16_kept_bytes=10)]
    assert pareto_chart(unplottable, [], None, LPIPS, out) is False
    assert pareto_chart([], [], None, LPIPS, out) is False
    assert not out.exists()


def smooth_image(seed: int, side: int) -> np.ndarray:
    """Gradients plus mild noise: closer to a generated image than pure noise, still not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y), np.sin(20 * x * y)], axis=-1) * 100 + 128
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def grid_rows(n_rows: int, titles: list[str], side: int) -> list:
    return [(f"prompt {i}: a lighthouse on a cliff at dusk, oil painting, dramatic sky",
             [(t, smooth_image(10 * i + j, side)) for j, t in enumerate(titles)])
            for i in range(n_rows)]


def test_image_grid_adds_a_diff_column_per_compared_image(tmp_path: Path) -> None:
    sizes = {}
    for titles in (["BF16"], ["BF16", "FP8 all"], ["BF16", "FP8 all", "recommended"]):
        out = tmp_path / f"{len(titles)}.png"
        image_grid(grid_rows(2, titles, 32), out)
        sizes[len(titles)] = png(out).size
    assert sizes[1][0] < sizes[2][0] < sizes[3][0]
    # two images plus one diff map are three cells; one image is one cell: far more than 2x wider
    assert sizes[2][0] - sizes[1][0] > 150


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_image_grid_cells_are_images_then_diff_maps(tmp_path: Path, n_images: int) -> None:
    # One row; scan across its middle: cells are wide non-white runs separated by white gaps
    # (text and the thin colorbar are shorter than min_len).
    out = tmp_path / "g.png"
    image_grid(grid_rows(1, ["BF16", "FP8 all", "recommended"][:n_images], 32), out)
    im = png(out)
    middle = np.asarray(im)[im.height // 2]
    assert runs(np.any(middle < 245, axis=1), min_len=60) == 2 * n_images - 1


def test_image_grid_four_rows_stays_small(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    image_grid(grid_rows(4, ["BF16", "FP8 all", "recommended", "greedy"], 256), out)
    im = png(out)
    assert out.stat().st_size < 1_000_000
    assert 600 <= im.width <= 2500 and 300 <= im.height <= 2000


def test_image_grid_upscales_small_images_without_blending(tmp_path: Path) -> None:
    # A 1-pixel red/blue checkerboard: any smoothing would create purple pixels.
    checker = np.zeros((32, 32, 3), np.uint8)
    checker[..., 0] = 255 * ((np.indices((32, 32)).sum(0) % 2) == 0)
    checker[..., 2] = 255 - checker[..., 0]
    out = tmp_path / "checker.png"
    image_grid([("checker", [("BF16", checker)])], out)  # one column: no heat map, no colorbar
    px = np.asarray(png(out)).astype(int)
    red = (px[..., 0] > 200) & (px[..., 1] < 50) & (px[..., 2] < 50)
    purple = (px[..., 0] > 60) & (px[..., 2] > 60) & (px[..., 1] < 40)
    assert red.sum() > 32 * 32 // 2 * 4  # each source pixel became several output pixels
    assert purple.sum() < 0.01 * red.sum()


def test_image_grid_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    img = smooth_image(0, 16)
    with pytest.raises(ValueError, match="cannot diff"):
        image_grid([("p", [("BF16", img), ("FP8", smooth_image(1, 24))])], out)
    with pytest.raises(ValueError, match="diff_against"):
        image_grid([("p", [("BF16", img), ("FP8", img)])], out, diff_against=2)
    with pytest.raises(ValueError, match="same number"):
        image_grid([("p", [("BF16", img), ("FP8", img)]), ("q", [("BF16", img)])], out)
    with pytest.raises(ValueError):
        image_grid([], out)
    assert not out.exists()
