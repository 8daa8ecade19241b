"""How a reducer spec spreads over a row's visual segments (images, anyres crops, video frames).

:func:`next_options` (LLaVA-NeXT) and :func:`video_options` (Video-LLaVA) wrap a spec (or a
:func:`~jaxprune.reducers.compose.compose` chain) with the policy a multi-segment family applies it with; a bare
spec gets the defaults. See :mod:`jaxprune.families.llava_next`
for what each field does on LLaVA-NeXT inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any


NEWLINES = ("prune", "keep", "drop")
CROP_SPLITS = ("real", "fixed")
FRAMES = ("per_frame", "global")


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


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """A reducer spec (or chain) plus how its budget spreads over a video's frames (Video-LLaVA, see
    :mod:`jaxprune.families.video_llava`). The budget is always the *video's* tokens reaching the LLM.

    * ``frames="per_frame"`` (default): every pre-LLM spec runs on each frame separately (``1 + P`` tokens, its own
      CLS attention and ``(g, g)`` grid) with the spec's declared per-segment rule ``spec.per_segment(F)`` (a
      ``budget`` field: ``budget // F`` per frame) -- what FasterVLM's Video-LLaVA code does (per-frame CLS).
    * ``frames="global"``: projector-stage specs rank all ``F * (1 + P)`` tokens of the video at once (each token
      with its own frame's CLS attention, keys and CLIP features; grid ``(1, F * (1 + P))``, so grid reducers
      are refused); vision-stage specs are refused (they run inside the tower, one frame at a time).

    In-LLM specs always select over the row's whole visual pool (one global ranking), whatever ``frames``."""

    reducer: Any
    frames: str = "per_frame"

    def __post_init__(self):
        if isinstance(self.reducer, (NextOptions, VideoOptions)):
            raise ValueError("video_options() cannot wrap another options wrapper")
        if self.frames not in FRAMES:
            raise ValueError(f"video_options: frames={self.frames!r} unknown; expected one of {FRAMES}")

    @property
    def stage(self) -> str:
        return "video_options"


def video_options(reducer, frames: str = "per_frame") -> VideoOptions:
    """How ``reducer``'s budget spreads over a video's frames: ``frames`` in per_frame | global (see
    :class:`VideoOptions`)."""
    return VideoOptions(reducer=reducer, frames=frames)


OPTIONS = (NextOptions, VideoOptions)


def unwrap(reducer) -> tuple[Any, NextOptions | VideoOptions]:
    """``(inner spec, options)``; a bare spec gets the default (NeXT) options."""
    if isinstance(reducer, OPTIONS):
        return reducer.reducer, reducer
    return reducer, NextOptions(reducer=reducer)
