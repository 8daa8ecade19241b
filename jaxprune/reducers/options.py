"""How a reducer spec spreads over a row's visual segments (images, anyres crops, video frames).

:func:`next_options` wraps a spec (or a :func:`~jaxprune.reducers.compose.compose` chain) with the policy a
multi-segment family applies it with; a bare spec gets the defaults. See :mod:`jaxprune.families.llava_next`
for what each field does on LLaVA-NeXT inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any


NEWLINES = ("prune", "keep", "drop")
CROP_SPLITS = ("real", "fixed")


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NextOptions:
    """A reducer spec (or :class:`~jaxprune.reducers.compose.Compose`) plus how to apply it to LLaVA-NeXT inputs."""

    reducer: Any
    newlines: str = "prune"
    per_crop: bool = False
    crop_split: str = "real"

    def __post_init__(self):
        if isinstance(self.reducer, NextOptions):
            raise ValueError("next_options() cannot wrap another next_options()")
        if self.newlines not in NEWLINES:
            raise ValueError(f"next_options: newlines={self.newlines!r} unknown; expected one of {NEWLINES}")
        if not isinstance(self.per_crop, bool):
            raise ValueError(f"next_options: per_crop must be a bool, got {self.per_crop!r}")
        if self.crop_split not in CROP_SPLITS:
            raise ValueError(f"next_options: crop_split={self.crop_split!r} unknown; expected one of {CROP_SPLITS}")

    @property
    def stage(self) -> str:
        return "next_options"


def next_options(reducer, newlines: str = "prune", per_crop: bool = False, crop_split: str = "real") -> NextOptions:
    """How ``reducer`` acts on LLaVA-NeXT inputs (see the module docstring): ``newlines`` in prune | keep | drop,
    ``per_crop`` (projector stage), ``crop_split`` in real | fixed (per-crop budgets)."""
    return NextOptions(reducer=reducer, newlines=newlines, per_crop=per_crop, crop_split=crop_split)


def unwrap(reducer) -> tuple[Any, NextOptions]:
    """``(inner spec, options)``; a bare spec gets the default options."""
    if isinstance(reducer, NextOptions):
        return reducer.reducer, reducer
    return reducer, NextOptions(reducer=reducer)
