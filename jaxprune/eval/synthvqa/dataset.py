"""Splits of the synthetic VQA set, reproducible from ``(split, seed)``.

Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, SPLIT_CODES[split], i])``, so it does
not depend on how many images are asked for (a 200-image slice is a prefix of the 2000-image split) and
the three splits never share a random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .questions import QA, QTYPES, questions_for
from .scene import GRID, IMAGE_SIZE, Rendered, Scene, render, sample_scene

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Item:
    image_id: str
    scene: Scene
    qas: tuple[QA, ...]


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLIT_CODES)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


#: random-stream code of each non-default scene style (``"grid"`` keeps the original streams)
STYLE_CODES: dict[str, int] = {"large": 1}


def make_item(split: str, seed: int, index: int, qtypes: tuple[str, ...] = QTYPES,
              objects: tuple[int, int] = (3, 5), style: str = "grid") -> Item:
    """Image ``index`` of a split with its questions. ``objects`` = (min, max) objects per image: the
    benchmark uses the default (3, 5); training curricula may draw easier scenes (another random stream:
    the id then says ``_o{min}{max}``). ``style``: a scene style of :data:`~.scene.STYLES`; ``"large"`` draws
    from its own stream (the id then ends in ``_large``), the default ``"grid"`` from the original one."""
    if style != "grid":
        if style not in STYLE_CODES:
            raise ValueError(f"unknown scene style {style!r}; known: {('grid', *STYLE_CODES)}")
        _rng(split, seed, index)  # validates split / seed / index
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index, 100 * objects[0] + objects[1],
                                     STYLE_CODES[style]])
    else:
        rng = _rng(split, seed, index) if objects == (3, 5) else np.random.default_rng(
            [seed, SPLIT_CODES[split], index, 100 * objects[0] + objects[1]])
    scene = sample_scene(rng, *objects, style=style)
    tag = ("" if objects == (3, 5) else f"_o{objects[0]}{objects[1]}") + ("" if style == "grid" else f"_{style}")
    return Item(f"{split}_{seed}_{index:06d}{tag}", scene, tuple(questions_for(scene, rng, qtypes)))


def make_items(split: str, seed: int, n_images: int, start: int = 0,
               qtypes: tuple[str, ...] = QTYPES, objects: tuple[int, int] = (3, 5), style: str = "grid") -> list[Item]:
    """Images ``start .. start + n_images - 1`` of a split (:func:`make_item`)."""
    return [make_item(split, seed, i, qtypes, objects, style) for i in range(start, start + n_images)]


@dataclass(frozen=True)
class RenderedSet:
    """Images and per-patch labels of a list of items, stacked."""
    images: np.ndarray       # [N, S, S, 3] uint8
    colour_map: np.ndarray   # [N, G, G] int8
    shape_map: np.ndarray    # [N, G, G] int8
    centre_map: np.ndarray   # [N, G, G] bool


def render_items(items: list[Item]) -> RenderedSet:
    rs: list[Rendered] = [render(it.scene) for it in items]
    if not rs:
        z = np.zeros((0, GRID, GRID), np.int8)
        return RenderedSet(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), z, z, z.astype(bool))
    return RenderedSet(np.stack([r.image for r in rs]), np.stack([r.colour_map for r in rs]),
                       np.stack([r.shape_map for r in rs]), np.stack([r.centre_map for r in rs]))
