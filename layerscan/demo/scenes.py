"""Seeded procedural scenes for the demo pipeline: one flat shape on a flat background, with a caption.

A scene is a shape (circle, square, triangle) of one of eight colours, centred in one cell of a
3x3 grid (with a small random offset, size and colour jitter), on a white, black or gray
background. Its caption names all four attributes, e.g. "a red circle in the top left on a white
background", and :mod:`layerscan.demo.checker` reads the same four attributes back from a picture.

Rendering is one batched, supersampled rasteriser in torch, so the training script draws hundreds
of thousands of scenes on the GPU and the tests draw a few on the CPU with the same code. Everything
is a pure function of a seed: ``sample_scenes(n, seed)`` gives the same scenes on every machine
(numpy's PCG64), and rendering involves no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "IMAGE_SIZE",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "all_captions",
    "caption",
    "draw",
    "render",
    "sample_scenes",
]

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")

# Shape colours: eight hues far apart in Lab, none close to a background colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 165, 70),
    "cyan": (40, 200, 215),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 190),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUNDS}
"""Every named colour a scene can contain: what the checker matches measured colours against."""

# Grid cells in reading order, named as they appear in captions: (name, row, column).
POSITIONS: tuple[tuple[str, int, int], ...] = (
    ("top left", 0, 0),
    ("top center", 0, 1),
    ("top right", 0, 2),
    ("middle left", 1, 0),
    ("center", 1, 1),
    ("middle right", 1, 2),
    ("bottom left", 2, 0),
    ("bottom center", 2, 1),
    ("bottom right", 2, 2),
)

# Geometry in pixels of a 64 px image. A cell is 21.3 px wide; the shape's half-size and offset
# keep it inside the image and its centre well inside its cell.
_HALF_SIZE = (6.5, 8.5)
_MAX_OFFSET = 2.0
_COLOUR_JITTER = 10
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One scene: the four captioned attributes plus the geometry that makes each picture differ."""

    shape: str
    colour: str
    position: str
    background: str
    cx: float  # shape centre in pixels (x to the right, y down; pixel centres at 0.5, 1.5, ...)
    cy: float
    half_size: float  # half the shape's width and height, in pixels
    rgb: tuple[int, int, int]  # the shape's colour after jitter
    bg_rgb: tuple[int, int, int]  # the background's colour after jitter

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position, self.background)


def caption(colour: str, shape: str, position: str, background: str) -> str:
    """The caption of a scene with these attributes; the wording the checker parses."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} in the {position} on a {background} background"


def all_captions() -> list[str]:
    """Every distinct caption (8 colours x 3 shapes x 9 positions x 3 backgrounds = 648), in a fixed order."""
    return [
        caption(c, s, p[0], b) for c, s, p, b in product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
    ]


def cell_centre(row: int, col: int, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """Centre (x, y) of grid cell (row, col) in pixels."""
    cell = size / 3
    return (col + 0.5) * cell, (row + 0.5) * cell


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes drawn uniformly over shapes, colours, positions and backgrounds, from ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOURS), size=n)
    positions = rng.integers(len(POSITIONS), size=n)
    backgrounds = rng.integers(len(BACKGROUNDS), size=n)
    offsets = rng.uniform(-_MAX_OFFSET, _MAX_OFFSET, size=(n, 2))
    half = rng.uniform(*_HALF_SIZE, size=n)
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=(n, 2, 3))
    rgb = np.clip(np.array(list(COLOURS.values()))[colours] + jitter[:, 0], 0, 255).tolist()
    bg_rgb = np.clip(np.array(list(BACKGROUNDS.values()))[backgrounds] + jitter[:, 1], 0, 255).tolist()
    colour_names, bg_names = list(COLOURS), list(BACKGROUNDS)
    centres = [cell_centre(row, col) for _, row, col in POSITIONS]
    scenes = []
    for i, (s, c, p, b, (ox, oy), h) in enumerate(zip(shapes.tolist(), colours.tolist(), positions.tolist(),
                                                    backgrounds.tolist(), offsets.tolist(), half.tolist())):
        x, y = centres[p]
        scenes.append(Scene(
            shape=SHAPES[s], colour=colour_names[c], position=POSITIONS[p][0], background=bg_names[b],
            cx=x + ox, cy=y + oy, half_size=h, rgb=tuple(rgb[i]), bg_rgb=tuple(bg_rgb[i]),
        ))
    return scenes


def coverage(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor,
             size: int = IMAGE_SIZE, supersample: int = _SUPERSAMPLE) -> torch.Tensor:
    """Fraction of each pixel covered by each shape, shape (N, size, size), values in [0, 1].

    ``shape`` holds indices into :data:`SHAPES`; the other arguments are (N,) float tensors on one
    device. Shapes: a disc of radius ``half``; an axis-aligned square of half-side ``half``; an
    upright isosceles triangle with its apex at (cx, cy - half) and its base from (cx - half,
    cy + half) to (cx + half, cy + half). Coverage is measured on a ``supersample``-times finer grid.
    """
    device = cx.device
    fine = size * supersample
    coords = (torch.arange(fine, device=device, dtype=torch.float32) + 0.5) / supersample
    dx = coords.view(1, 1, fine) - cx.view(-1, 1, 1).float()
    dy = coords.view(1, fine, 1) - cy.view(-1, 1, 1).float()
    h = half.view(-1, 1, 1).float()
    kind = shape.view(-1, 1, 1)
    circle = dx * dx + dy * dy <= h * h
    square = (dx.abs() <= h) & (dy.abs() <= h)
    triangle = (dy <= h) & (dx.abs() <= (dy + h) / 2)
    inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    n = inside.shape[0]
    return inside.float().view(n, size, supersample, size, supersample).mean(dim=(2, 4))


def render(scenes: list[Scene], device: str | torch.device = "cpu", size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes as a float tensor (N, 3, size, size) in [0, 1], antialiased by supersampling."""
    device = torch.device(device)

    def tensor(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    cover = coverage(
        tensor([SHAPES.index(s.shape) for s in scenes], torch.long),
        tensor([s.cx for s in scenes]), tensor([s.cy for s in scenes]),
        tensor([s.half_size for s in scenes]), size=size,
    ).unsqueeze(1)
    fg = tensor([s.rgb for s in scenes]).view(-1, 3, 1, 1) / 255
    bg = tensor([s.bg_rgb for s in scenes]).view(-1, 3, 1, 1) / 255
    return bg + (fg - bg) * cover


def draw(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """One scene as an HxWx3 uint8 image."""
    image = render([scene], size=size)[0].permute(1, 2, 0).numpy()
    return np.round(image * 255).astype(np.uint8)
