"""The noise floor counts only variants that changed something."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from layerscan.floor import measure_floor
from layerscan.metrics import Scorer


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]


def _nudged(images: list[np.ndarray], amount: int) -> list[np.ndarray]:
    out = [image.copy() for image in images]
    for image in out:
        image[:8, :8] = np.clip(image[:8, :8].astype(int) + amount, 0, 255).astype(np.uint8)
    return out


def test_a_bit_identical_variant_is_flagged_and_not_counted():
    scorer = Scorer(("psnr", "ssim"))
    reference = _images(0)
    baseline = SimpleNamespace(images=reference, parts=[], floor_images={
        "same": [image.copy() for image in reference], "moved": _nudged(reference, 3)})
    floor = measure_floor(scorer, baseline, ["a", "b", "c"])
    assert floor.identical == ("same",)
    moved = floor.variants["moved"]
    assert floor.mean == moved["mean"] and floor.worst == moved["worst"]  # "same" did not count
    assert floor.variants["same"]["mean"]["psnr"] > moved["mean"]["psnr"]
    assert floor.as_dict()["variants"]["same"]["counted"] is False
    assert floor.as_dict()["identical_variants"] == ["same"]


def test_when_no_variant_changes_anything_the_floor_is_that_of_identical_outputs():
    scorer = Scorer(("psnr",))
    reference = _images(1)
    baseline = SimpleNamespace(images=reference, parts=[], floor_images={
        "a": [image.copy() for image in reference], "b": [image.copy() for image in reference]})
    floor = measure_floor(scorer, baseline, ["a", "b", "c"])
    assert floor.identical == ("a", "b")
    assert floor.mean["psnr"] == floor.variants["a"]["mean"]["psnr"]


def test_a_matrix_floor_counts_each_variant_where_it_changed_something():
    """Under compilation a variant may change nothing at one setting and something at another:
    it counts the setting where it measured something, and is flagged only where it never did."""
    scorer = Scorer(("psnr",))
    small, large = _images(2), _images(3)
    parts = [SimpleNamespace(images=small, parts=[], floor_images={"v": [small[0].copy()]}),
             SimpleNamespace(images=large, parts=[], floor_images={"v": _nudged(large, 5)})]
    matrix = SimpleNamespace(images=small + large, parts=parts, floor_images={})
    floor = measure_floor(scorer, matrix, ["a", "b", "c"] * 2)
    alone = measure_floor(scorer, parts[1], ["a", "b", "c"])
    assert floor.identical == () and floor.mean == alone.mean and floor.worst == alone.worst
    assert len(floor.variants["v"]["per_prompt"]) == 3
