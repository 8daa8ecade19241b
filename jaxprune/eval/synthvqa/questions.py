"""Questions about a :class:`~jaxprune.eval.synthvqa.scene.Scene`, each answerable from one small region.

Four types (:data:`QTYPES`), at most one of each per image, answers are single words or short phrases:

* ``colour`` -- "What color is the {shape}?" (asked only if that shape is unique in the image): a colour.
  Chance: 1/6 over all colours (about 1/2.7 among the colours present in an image).
* ``exist`` -- "Is there a {colour} {shape} in the image?": yes/no, balanced 50/50; the "no" pairs are
  adversarial (a present colour with another present shape, when possible). Chance 1/2.
* ``where`` -- "Where is the {colour} {shape}?" (unique pair): one of the 9 :data:`POSITIONS`. Chance 1/9.
* ``count`` -- "How many {colour} objects are there?" (a colour present): "one" / "two" / "three" ...
  Chance 1/3 (counts 1-3 dominate).

``text`` carries LLaVA's short-answer suffix, as the GQA/VQAv2 question files do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import COLOUR_NAMES, POSITIONS, SHAPES, Scene

QTYPES: tuple[str, ...] = ("colour", "exist", "where", "count")
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
#: Chance accuracy of each type (uniform guess over its answer set); see the module docstring.
CHANCE: dict[str, float] = {"colour": 1 / len(COLOUR_NAMES), "exist": 0.5, "where": 1 / len(POSITIONS),
                            "count": 1 / 3}


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str   # without the suffix
    answer: str

    @property
    def text(self) -> str:
        return self.question + SHORT_ANSWER_SUFFIX


def _colour_q(scene: Scene, rng: np.random.Generator) -> QA | None:
    unique = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
    if not unique:
        return None
    o = unique[int(rng.integers(len(unique)))]
    return QA("colour", f"What color is the {o.shape}?", o.colour)


def _exist_q(scene: Scene, rng: np.random.Generator) -> QA:
    if rng.random() < 0.5:
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        return QA("exist", f"Is there a {o.colour} {o.shape} in the image?", "yes")
    present_c = sorted({o.colour for o in scene.objects})
    present_s = sorted({o.shape for o in scene.objects})
    adversarial = [(c, s) for c in present_c for s in present_s if not scene.has(c, s)]
    pool = adversarial or [(c, s) for c in COLOUR_NAMES for s in SHAPES if not scene.has(c, s)]
    c, s = pool[int(rng.integers(len(pool)))]
    return QA("exist", f"Is there a {c} {s} in the image?", "no")


def _where_q(scene: Scene, rng: np.random.Generator) -> QA | None:
    unique = [o for o in scene.objects
              if sum(p.colour == o.colour and p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    o = unique[int(rng.integers(len(unique)))]
    return QA("where", f"Where is the {o.colour} {o.shape}?", POSITIONS[o.cell])


def _count_q(scene: Scene, rng: np.random.Generator) -> QA:
    present = sorted({o.colour for o in scene.objects})
    # Prefer colours used more than once half of the time, so answers are not mostly "one".
    multi = [c for c in present if scene.count(c) > 1]
    c = (multi if multi and rng.random() < 0.5 else present)
    colour = c[int(rng.integers(len(c)))]
    return QA("count", f"How many {colour} objects are there?", NUMBERS[scene.count(colour)])


_MAKERS = {"colour": _colour_q, "exist": _exist_q, "where": _where_q, "count": _count_q}


def questions_for(scene: Scene, rng: np.random.Generator, qtypes: tuple[str, ...] = QTYPES) -> list[QA]:
    """One question of each requested type that is well defined for ``scene`` (in ``qtypes`` order)."""
    bad = [q for q in qtypes if q not in _MAKERS]
    if bad:
        raise ValueError(f"unknown question types {bad}; known: {QTYPES}")
    out = []
    for q in qtypes:
        qa = _MAKERS[q](scene, rng)
        if qa is not None:
            out.append(qa)
    return out


def vocabulary() -> tuple[str, ...]:
    """Every word a question or an answer can use (lower case, as the word-level tokenizer splits them)."""
    words = ("what color is the is there a in image where how many objects are answer question using single "
             "word or phrase ? . yes no").split()
    extra = [w for p in POSITIONS for w in p.split()] + list(COLOUR_NAMES) + list(SHAPES) + list(NUMBERS)
    return tuple(dict.fromkeys(words + extra))
