"""Which patches a synthvqa question is about: the ``patch_prior`` the ``oracle`` reducer reads.

From the scene generator's per-patch labels (:func:`.scene.render`: a patch belongs to the object covering >= 1/4
of it) and the question's words:

* ``colour`` ("What color is the {shape}?"): the patches of that (unique) shape;
* ``exist`` ("Is there a {colour} {shape}?"): the patches of that object when the answer is yes; none when it is no
  (nothing in the image is the answer's evidence);
* ``where`` ("Where is the {colour} {shape}?"): the patches of that object;
* ``count`` ("How many {colour} objects?"): the patches of every object of that colour.

The same patches as the attention targets of the training script (``experiments/synthvqa/train.py``). The prior is
not flat: a target patch scores ``1 + 1 / (1 + d)``, ``d`` its Chebyshev distance (in patches) from the centre of
its object (objects are told apart by their 3x3 cell, one object per cell), so an oracle whose budget is smaller
than the target keeps the core of *every* asked object before the rim of any (a "how many" over three objects of
9-16 patches at 16 tokens keeps all three; the first prior, flat 1, kept the first object in raster order whole and
dropped the others).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .dataset import STYLE_CODES, make_item
from .questions import QA, QTYPES
from .scene import COLOUR_NAMES, GRID, SHAPES, Rendered, render

_QID = re.compile(r"^(train|val|test)_(\d+)_(\d+)(?:_(" + "|".join(STYLE_CODES) + r"))?_(" + "|".join(QTYPES)
                  + r")$")


def patch_prior(qa: QA, colour_map: np.ndarray, shape_map: np.ndarray) -> np.ndarray:
    """``[GRID * GRID]`` float32 in raster order: 1 on the patches ``qa`` asks about, 0 elsewhere (module docstring).
    ``colour_map`` / ``shape_map``: ``[GRID, GRID]`` labels of :class:`~.scene.Rendered`."""
    if colour_map.shape != (GRID, GRID) or shape_map.shape != (GRID, GRID):
        raise ValueError(f"colour_map / shape_map must be [{GRID}, {GRID}], got {colour_map.shape} / "
                         f"{shape_map.shape}")
    if qa.qtype not in QTYPES:
        raise ValueError(f"unknown question type {qa.qtype!r}; known: {QTYPES}")
    words = qa.question.lower().rstrip("?").split()
    c = next((COLOUR_NAMES.index(w) + 1 for w in words if w in COLOUR_NAMES), None)
    s = next((SHAPES.index(w) + 1 for w in words if w in SHAPES), None)
    if qa.qtype == "exist" and qa.answer == "no":
        return np.zeros(GRID * GRID, np.float32)
    m = colour_map > 0
    if c is not None:
        m &= colour_map == c
    if s is not None:
        m &= shape_map == s
    return centre_weights(m)


def centre_weights(mask: np.ndarray) -> np.ndarray:
    """``[GRID * GRID]`` float32: ``1 + 1 / (1 + d)`` on the patches of ``mask [GRID, GRID]`` (``d``: Chebyshev
    distance from the mean position of the masked patches of the same 3x3 cell), 0 elsewhere."""
    out = np.zeros((GRID, GRID), np.float32)
    step = GRID // 3
    for cy in range(3):
        for cx in range(3):
            sub = mask[cy * step:(cy + 1) * step, cx * step:(cx + 1) * step]
            ys, xs = np.nonzero(sub)
            if not len(ys):
                continue
            d = np.maximum(np.abs(ys - ys.mean()), np.abs(xs - xs.mean()))
            out[cy * step + ys, cx * step + xs] = 1.0 + 1.0 / (1.0 + d)
    return out.reshape(-1)


def prior_of(qa: QA, rendered: Rendered) -> np.ndarray:
    """:func:`patch_prior` of a question about a rendered scene."""
    return patch_prior(qa, rendered.colour_map, rendered.shape_map)


def prior_for_question_id(question_id: str) -> np.ndarray:
    """:func:`patch_prior` of a benchmark question from its id alone (``{split}_{seed}_{index:06d}[_{style}]_{qtype}``,
    as :func:`.export.question_id` writes it): the scene is regenerated from ``(split, seed, index, style)``."""
    mt = _QID.match(str(question_id))
    if mt is None:
        raise ValueError(f"{question_id!r} is not a synthvqa question id ({{split}}_{{seed}}_{{index:06d}}_{{qtype}})")
    split, seed, index, style, qtype = mt.group(1), int(mt.group(2)), int(mt.group(3)), mt.group(4), mt.group(5)
    priors = _image_priors(split, seed, index, style or "grid")
    if qtype not in priors:
        raise ValueError(f"{question_id!r}: image {index} of ({split}, seed {seed}) has no {qtype} question")
    return priors[qtype].copy()


@functools.lru_cache(maxsize=64)
def _image_priors(split: str, seed: int, index: int, style: str) -> dict[str, np.ndarray]:
    """qtype -> prior for every question of one generated image (one render for its questions)."""
    item = make_item(split, seed, index, style=style)
    rd = render(item.scene)
    return {qa.qtype: prior_of(qa, rd) for qa in item.qas}
