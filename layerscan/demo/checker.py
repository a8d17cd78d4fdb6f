"""Task-level fidelity: does a generated picture show what its prompt asked for?

``check(image, prompt)`` reads a demo prompt ("a red circle in the top left on a white background"),
then reads the picture with plain image analysis and says, attribute by attribute, whether they
agree:

1. background colour: the median colour of the picture (the shape covers under a tenth of it);
2. the shape: pixels far from the background in colour; the shape's colour is the typical colour
   of the most distinct of them; every pixel then gets a coverage in [0, 1] (how far along the line
   from background colour to shape colour it lies), and the shape is the largest connected region
   covered more than half, holes filled;
3. colour: the shape's inner pixels' median colour, named by its nearest palette colour in CIELAB;
4. position: the coverage-weighted centroid, as a cell of the 3x3 grid;
5. shape: the coverage compared with an ideal circle, square and upright triangle drawn in the
   region's bounding box, each sharp and softened by a few edge blurs; the best overlap (soft IoU)
   names it.

Colours are named against the whole palette (shape colours and background colours), so a gray blob
asked to be blue counts as wrong. Nothing here was fitted to generated images: thresholds are
geometric (half coverage, a minimum area) and the tests exercise them on independently drawn pictures.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from layerscan.demo.scenes import PALETTE, POSITIONS, SHAPES, coverage

__all__ = ["CheckResult", "Reading", "SceneSpec", "accuracy", "check", "parse_prompt", "read_image"]

ATTRIBUTES = ("colour", "shape", "position", "background")

# A shape must differ from the background by at least this much (RGB distance, 0-441) to count.
_MIN_CONTRAST = 40.0
# A region smaller than this many pixels (about a 4x4 square) is noise, not a shape.
_MIN_AREA = 16
# Edge softness (Gaussian sigma, pixels) the ideal shapes are compared at: a decoder's soft edges
# round a square's corners, which a sharp template would mistake for a circle.
_EDGE_BLURS = (0.0, 0.7, 1.4, 2.1)
_POSITION_WORDS = {
    "top left": (0, 0), "upper left": (0, 0),
    "top right": (0, 2), "upper right": (0, 2),
    "bottom left": (2, 0), "lower left": (2, 0),
    "bottom right": (2, 2), "lower right": (2, 2),
    "top center": (0, 1), "top middle": (0, 1), "top": (0, 1),
    "bottom center": (2, 1), "bottom middle": (2, 1), "bottom": (2, 1),
    "middle left": (1, 0), "center left": (1, 0), "left": (1, 0),
    "middle right": (1, 2), "center right": (1, 2), "right": (1, 2),
    "center": (1, 1), "middle": (1, 1), "centre": (1, 1),
}
_CELL_NAMES = {(row, col): name for name, row, col in POSITIONS}
_SYNONYMS = {"grey": "gray", "centre": "center"}


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for; ``None`` where the prompt does not say."""

    colour: str | None
    shape: str | None
    position: str | None  # a name from scenes.POSITIONS
    background: str | None


@dataclass(frozen=True)
class Reading:
    """What the picture shows; ``None`` where nothing could be read (no shape found)."""

    colour: str | None
    shape: str | None
    position: str | None
    background: str
    centroid: tuple[float, float] | None  # (x, y) in pixels
    area: float  # covered pixels
    shape_scores: dict[str, float]  # soft IoU with each ideal shape


@dataclass(frozen=True)
class CheckResult:
    """Per-attribute agreement between prompt and picture; ``correct`` when all asked-for ones agree."""

    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    background_ok: bool
    correct: bool
    expected: SceneSpec
    found: Reading


def _normalise(prompt: str) -> str:
    words = re.findall(r"[a-z]+", prompt.lower())
    return " ".join(_SYNONYMS.get(w, w) for w in words)


def parse_prompt(prompt: str) -> SceneSpec:
    """Read colour, shape, grid position and background colour out of a demo-style prompt.

    The background is the colour word right before "background"; the shape's colour is the first
    other colour word; the position is the longest known phrase ("top left", "center", ...) found.
    """
    text = _normalise(prompt)
    background = None
    if match := re.search(r"\b([a-z]+) background\b", text):
        if match.group(1) in PALETTE:
            background = match.group(1)
        text = text[:match.start()] + text[match.end():]
    words = text.split()
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES), None)
    position = None
    for phrase in sorted(_POSITION_WORDS, key=len, reverse=True):
        if re.search(rf"\b{phrase}\b", text):
            position = _CELL_NAMES[_POSITION_WORDS[phrase]]
            break
    return SceneSpec(colour, shape, position, background)


# ----------------------------------------------------------------------------------------------
# Reading pictures
# ----------------------------------------------------------------------------------------------

_PALETTE_NAMES = list(PALETTE)


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


_PALETTE_LAB = _lab(np.array([PALETTE[n] for n in _PALETTE_NAMES]))


def _name_colour(rgb: np.ndarray, names: Iterable[str] = _PALETTE_NAMES) -> str:
    """The palette name nearest to ``rgb`` in CIELAB (CIE76 distance)."""
    names = list(names)
    lab = _lab(rgb)[0]
    index = [_PALETTE_NAMES.index(n) for n in names]
    distances = np.linalg.norm(_PALETTE_LAB[index] - lab, axis=1)
    return names[int(np.argmin(distances))]


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask``, holes filled."""
    from scipy.ndimage import binary_fill_holes
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return binary_fill_holes(labels == int(np.argmax(sizes)))


def _shape_scores(alpha: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """Soft IoU between the region's coverage and each ideal shape inscribed in its bounding box."""
    import torch
    from scipy.ndimage import binary_dilation, gaussian_filter

    ys, xs = np.nonzero(region)
    # The box around pixels covered more than half; its edges sit half a pixel outside them.
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    h = max(half_w, half_h)
    # Work in a square window around the box, with a margin for soft edges.
    side = int(np.ceil(2 * h)) + 12
    ox, oy = int(np.floor((x0 + x1) / 2 - side / 2)), int(np.floor((y0 + y1) / 2 - side / 2))
    cx, cy = (x0 + x1) / 2 - ox, (y0 + y1) / 2 - oy
    n = len(SHAPES)
    ideal = coverage(torch.arange(n), torch.full((n,), cx), torch.full((n,), cy), torch.full((n,), h),
                     size=side).numpy()
    if half_w != half_h:  # drawn in a square box: squash along the shorter side
        ideal = _stretch(ideal, cx, cy, half_w, half_h, h)
    soft = np.zeros((side, side))
    height, width = alpha.shape
    sy0, sy1, sx0, sx1 = max(oy, 0), min(oy + side, height), max(ox, 0), min(ox + side, width)
    # The region plus its soft rim: coverage outside a few pixels of the region is someone else's.
    near = binary_dilation(region, iterations=3)
    soft[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox] = np.where(near, alpha, 0.0)[sy0:sy1, sx0:sx1]
    scores = {}
    for kind, sharp in zip(SHAPES, ideal):
        best = 0.0
        for sigma in _EDGE_BLURS:
            template = gaussian_filter(sharp, sigma) if sigma else sharp
            union = np.maximum(soft, template).sum()
            best = max(best, float(np.minimum(soft, template).sum() / union) if union > 0 else 0.0)
        scores[kind] = best
    return scores


def _stretch(ideal: np.ndarray, cx: float, cy: float, half_w: float, half_h: float, h: float) -> np.ndarray:
    """Squash square-box templates to a ``half_w`` x ``half_h`` box by resampling about the centre."""
    from scipy.ndimage import affine_transform

    out = np.empty_like(ideal)
    # output pixel (y, x) samples input (cy + (y - cy) * h / half_h, cx + (x - cx) * h / half_w);
    # array index i has its pixel centre at i + 0.5.
    matrix = np.diag([h / half_h, h / half_w])
    centre = np.array([cy - 0.5, cx - 0.5])
    offset = centre - matrix @ centre
    for i, template in enumerate(ideal):
        out[i] = affine_transform(template, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    return out


def read_image(image: np.ndarray) -> Reading:
    """Read background colour, and the shape's colour, kind and grid cell, from an HxWx3 uint8 picture."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255 if image.dtype.kind == "f" else image), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    pixels = image.astype(np.float64)
    bg = np.median(pixels.reshape(-1, 3), axis=0)
    background = _name_colour(bg)
    none = Reading(None, None, None, background, None, 0.0, {})

    distance = np.linalg.norm(pixels - bg, axis=2)
    if distance.max() < _MIN_CONTRAST:
        return none
    # Seed: pixels at least half as distinct as the most distinct few; their region's core colour.
    seed = _largest_region(distance >= 0.5 * np.percentile(distance, 99.5))
    core = seed & (distance >= np.percentile(distance[seed], 50))
    fg = np.median(pixels[core], axis=0)
    direction = fg - bg
    contrast = np.linalg.norm(direction)
    if contrast < _MIN_CONTRAST:
        return none
    alpha = np.clip(((pixels - bg) @ direction) / contrast**2, 0.0, 1.0)
    # Pixels off the background-to-shape line (another colour entirely) do not count as the shape.
    residual = np.linalg.norm((pixels - bg) - alpha[..., None] * direction, axis=2)
    alpha = np.where(residual > 0.5 * contrast, 0.0, alpha)
    region = _largest_region(alpha > 0.5)
    area = float(alpha[region].sum())
    if region.sum() < _MIN_AREA:
        return Reading(None, None, None, background, None, area, {})

    inner = region & (alpha > 0.75)
    colour = _name_colour(np.median(pixels[inner if inner.any() else region], axis=0))
    weights = np.where(region, alpha, 0.0)
    ys, xs = np.mgrid[0:height, 0:width]
    x = float((weights * (xs + 0.5)).sum() / weights.sum())
    y = float((weights * (ys + 0.5)).sum() / weights.sum())
    row = min(int(y / (height / 3)), 2)
    col = min(int(x / (width / 3)), 2)
    scores = _shape_scores(alpha, region)
    shape = max(scores, key=scores.get) if scores else None
    return Reading(colour, shape, _CELL_NAMES[(row, col)], background, (x, y), area, scores)


def check(image: np.ndarray, prompt: str) -> CheckResult:
    """Whether ``image`` (HxWx3 uint8) shows the colour, shape, position and background ``prompt`` asks for.

    An attribute the prompt does not mention counts as satisfied.
    """
    spec = parse_prompt(prompt)
    found = read_image(image)
    colour_ok = spec.colour is None or found.colour == spec.colour
    shape_ok = spec.shape is None or found.shape == spec.shape
    position_ok = spec.position is None or found.position == spec.position
    background_ok = spec.background is None or found.background == spec.background
    return CheckResult(colour_ok, shape_ok, position_ok, background_ok,
                       colour_ok and shape_ok and position_ok and background_ok, spec, found)


def accuracy(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose colour, shape, position and background (and all four) match their prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no images to check")
    results = [check(image, prompt) for image, prompt in zip(images, prompts)]
    n = len(results)
    out = {name: sum(getattr(r, f"{name}_ok") for r in results) / n for name in ATTRIBUTES}
    out["correct"] = sum(r.correct for r in results) / n
    out["n"] = n
    return out


def describe(result: CheckResult) -> dict:
    """A JSON-friendly summary of one check, for logs."""
    return {"ok": {a: getattr(result, f"{a}_ok") for a in ATTRIBUTES}, "correct": result.correct,
            "expected": asdict(result.expected),
            "found": {k: v for k, v in asdict(result.found).items() if k != "shape_scores"},
            "shape_scores": {k: round(v, 3) for k, v in result.found.shape_scores.items()}}

