"""Synthetic VQA scenes: small coloured shapes on a cluttered grey background, one object per 3x3 cell.

The image is ``IMAGE_SIZE`` px square and meant for a ViT with ``PATCH`` px patches: a ``GRID x GRID``
= 12 x 12 = 144-token grid, so budgets 48/32/16/8 are exactly LLaVA-1.5's 192/128/64/32 of 576.

* The image is split into a 3x3 layout of 32 px cells (the answers of "where" questions); 3-5 of the
  cells hold one object each: a 16 px box aligned to the patch grid (exactly 2x2 patches) at one of 3x3
  patch offsets inside its cell, so an answer depends on 4 of the 144 patches. (A first version drew
  12-16 px objects at any pixel offset: a patch then held an arbitrary fragment of a shape, and the
  from-scratch tower separated circles from squares too slowly for the CPU budget -- see
  ``experiments/results/synthvqa_training.md``.)
* Colours: :data:`COLOURS` (saturated); shapes: :data:`SHAPES`. The clutter is grey only (random
  rectangles, lines and pixel noise of random grey levels), so it never carries a colour answer.
* Option ``style="large"`` (:data:`STYLES`; training recipe of issue #16, not the benchmark's default): objects of
  3x3 / 4x4 patches on a textured grey background -- the spatial redundancy of real photos (many patches per object,
  look-alike background patches).
* Every render also returns per-patch labels (colour, shape, object-centre flag) -- the auxiliary
  targets the training script uses for the vision tower -- and the set of (colour, shape) pairs present.

Everything is a pure function of a ``numpy.random.Generator``: the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 96
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 12
CELL = IMAGE_SIZE // 3      # 32
OBJECT = 2 * PATCH          # 16 px: 2x2 patches

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25), "green": (20, 175, 40), "blue": (30, 70, 230),
    "yellow": (240, 220, 20), "purple": (150, 40, 190), "orange": (245, 140, 10)}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
#: 3x3 cell index (row-major) -> the answer of a "where" question.
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int       # 0..8, row-major 3x3
    cx: int         # centre, px
    cy: int
    size: int       # px across


#: scene styles: ``"grid"`` (the benchmark's and the shipped model's: 2x2-patch objects on grey clutter) and
#: ``"large"`` (spatial redundancy as in photos: 3x3 / 4x4-patch objects on a textured grey background).
STYLES: tuple[str, ...] = ("grid", "large")
#: object sizes (px) of the ``"large"`` style: 3x3 and 4x4 patches (9-16 patches per object).
LARGE_SIZES: tuple[int, ...] = (3 * PATCH, 4 * PATCH)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    clutter_seed: int
    style: str = "grid"

    def count(self, colour: str) -> int:
        return sum(o.colour == colour for o in self.objects)

    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]

    def has(self, colour: str, shape: str) -> bool:
        return any(o.colour == colour and o.shape == shape for o in self.objects)


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray        # [S, S, 3] uint8
    colour_map: np.ndarray   # [GRID, GRID] int8: 0 background, 1 + index into COLOUR_NAMES
    shape_map: np.ndarray    # [GRID, GRID] int8: 0 background, 1 + index into SHAPES
    centre_map: np.ndarray   # [GRID, GRID] bool: patch holding an object's centre pixel


def sample_scene(rng: np.random.Generator, min_objects: int = 3, max_objects: int = 5, style: str = "grid") -> Scene:
    """3-5 objects in distinct cells. Colours repeat on purpose (so "how many" has answers 1-3) and some
    shapes repeat (so "what colour is the X" is only asked where X is unique -- see :mod:`.questions`).

    ``style="large"``: each object is 24 or 32 px (3x3 or 4x4 patches, aligned to the patch grid, at any patch
    offset that keeps it inside its cell) and :func:`render` draws a textured background; ``"grid"`` (default)
    draws exactly what it always drew from the same generator state."""
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; known: {STYLES}")
    if style == "large":
        return _sample_large(rng, min_objects, max_objects)
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    # A small palette per image: 2..n colours, so a colour is often used 2-3 times.
    palette = rng.choice(len(COLOUR_NAMES), size=int(rng.integers(min(2, n), n + 1)), replace=False)
    objs = []
    for c in sorted(int(x) for x in cells):
        size = OBJECT
        cx = (c % 3) * CELL + PATCH * int(rng.integers(0, 3)) + OBJECT // 2
        cy = (c // 3) * CELL + PATCH * int(rng.integers(0, 3)) + OBJECT // 2
        objs.append(Obj(COLOUR_NAMES[int(rng.choice(palette))], SHAPES[int(rng.integers(len(SHAPES)))],
                        c, cx, cy, size))
    return Scene(tuple(objs), int(rng.integers(2 ** 31)))


def _sample_large(rng: np.random.Generator, min_objects: int, max_objects: int) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    palette = rng.choice(len(COLOUR_NAMES), size=int(rng.integers(min(2, n), n + 1)), replace=False)
    objs = []
    for c in sorted(int(x) for x in cells):
        size = LARGE_SIZES[int(rng.integers(len(LARGE_SIZES)))]
        slack = (CELL - size) // PATCH  # patch offsets that keep the object inside its cell
        cx = (c % 3) * CELL + PATCH * int(rng.integers(0, slack + 1)) + size // 2
        cy = (c // 3) * CELL + PATCH * int(rng.integers(0, slack + 1)) + size // 2
        objs.append(Obj(COLOUR_NAMES[int(rng.choice(palette))], SHAPES[int(rng.integers(len(SHAPES)))],
                        c, cx, cy, size))
    return Scene(tuple(objs), int(rng.integers(2 ** 31)), "large")


def _texture(rng: np.random.Generator) -> PIL.Image.Image:
    """A grey textured background (never a colour answer): one periodic pattern over the image (stripes at a
    random angle or a checkerboard, random period and contrast) + a smooth shading gradient + pixel noise, so
    neighbouring background patches look alike, as the background of a photo does."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    base = float(rng.uniform(90, 170))
    period = float(rng.uniform(5, 14))
    amp = float(rng.uniform(12, 35))
    if rng.random() < 0.5:
        theta = float(rng.uniform(0, np.pi))
        pattern = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    else:
        pattern = np.sign(np.sin(np.pi * xx / period) * np.sin(np.pi * yy / period))
    gx, gy = rng.uniform(-0.4, 0.4, 2)
    g = base + amp * pattern + gx * (xx - IMAGE_SIZE / 2) + gy * (yy - IMAGE_SIZE / 2)
    g = g + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE))
    g = np.clip(np.round(g), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, o: Obj, fill) -> None:
    h = o.size / 2
    x0, y0, x1, y1 = o.cx - h, o.cy - h, o.cx + h - 1, o.cy + h - 1
    if o.shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
        draw.polygon(((o.cx, y0), (x1, y1), (x0, y1)), fill=fill)
    elif o.shape == "cross":
        t = max(2, o.size // 4)
        draw.rectangle((o.cx - t, y0, o.cx + t - 1, y1), fill=fill)
        draw.rectangle((x0, o.cy - t, x1, o.cy + t - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")


def _clutter(rng: np.random.Generator) -> PIL.Image.Image:
    base = int(rng.integers(90, 170))
    a = np.full((IMAGE_SIZE, IMAGE_SIZE), base, np.int16)
    img = PIL.Image.fromarray(a.astype(np.uint8), "L")
    d = PIL.ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.integers(0, IMAGE_SIZE, 2)
        w, h = rng.integers(4, 30, 2)
        d.rectangle((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=int(rng.integers(40, 220)))
    for _ in range(int(rng.integers(4, 10))):
        p = rng.integers(0, IMAGE_SIZE, 4)
        d.line(tuple(int(v) for v in p), fill=int(rng.integers(30, 230)), width=int(rng.integers(1, 3)))
    g = np.asarray(img, np.int16) + rng.integers(-12, 13, (IMAGE_SIZE, IMAGE_SIZE))
    g = np.clip(g, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")


def render(scene: Scene) -> Rendered:
    """Draw ``scene`` (clutter from ``scene.clutter_seed``) and label every patch with the object covering
    most of it (>= 1/4 of its pixels), else background."""
    bg = _texture if scene.style == "large" else _clutter
    img = bg(np.random.default_rng(scene.clutter_seed))
    draw = PIL.ImageDraw.Draw(img)
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, np.int16)
    for i, o in enumerate(scene.objects):
        _draw_shape(draw, o, COLOURS[o.colour])
        m = PIL.Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(PIL.ImageDraw.Draw(m), o, 255)
        owner[np.asarray(m) > 0] = i
    cover = np.stack([(owner == i) for i in range(len(scene.objects))])  # [n, S, S]
    cover = cover.reshape(len(scene.objects), GRID, PATCH, GRID, PATCH).sum((2, 4))  # [n, G, G]
    best = cover.argmax(0)
    has = cover.max(0) >= PATCH * PATCH // 4
    colour_map = np.zeros((GRID, GRID), np.int8)
    shape_map = np.zeros((GRID, GRID), np.int8)
    centre_map = np.zeros((GRID, GRID), bool)
    for i, o in enumerate(scene.objects):
        sel = has & (best == i)
        colour_map[sel] = 1 + COLOUR_NAMES.index(o.colour)
        shape_map[sel] = 1 + SHAPES.index(o.shape)
        centre_map[min(o.cy // PATCH, GRID - 1), min(o.cx // PATCH, GRID - 1)] = True
    return Rendered(np.asarray(img, np.uint8).copy(), colour_map, shape_map, centre_map)
