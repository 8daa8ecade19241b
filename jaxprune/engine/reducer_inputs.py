"""Per-image inputs that some reducers read besides the model's own signals (``model(..., reducer_inputs=...)``).

A reducer lists the names it reads in its ``inputs`` class variable (:class:`~jaxprune.reducers.base.ReducerBase`);
the caller passes ``reducer_inputs={name: array [N_images, P]}``, one row per image in reading order and one value
per patch of the tower's grid (``P`` = ``cfg.vision.num_patches``, CLS excluded). The only user today is the
synthvqa ``oracle`` (``patch_prior``: which patches hold the object the question asks about, known from the scene
generator), so the path exists on LLaVA-1.5 (``model_type="llava"``) models only and is refused by name on the
others. Names no reducer of the spec reads are ignored (a benchmark may pass its inputs for every reducer of a sweep,
the full model included); a missing name, a wrong shape or a non-finite value is an :class:`InputError`.

The arrays travel in the plan's per-image ``tables`` under ``"reducer_inputs"`` (so they are split over devices like
the pixels) only when a reducer reads them: the program's input structure is then a function of the static spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxprune.inputs import InputError
from jaxprune.reducers.base import INPUTS_TABLE_KEY as TABLE_KEY
#: families whose encoder hands them to the projector-stage reducers
FAMILIES = ("llava",)


def needed(reducers: tuple) -> tuple[str, ...]:
    """Names the reducers of a (flattened) spec read, in first-use order."""
    out: list[str] = []
    for r in reducers:
        for n in getattr(r, "inputs", ()) or ():
            if n not in out:
                out.append(n)
    return tuple(out)


def check_reducer_inputs(cfg, reducers: tuple, given: Mapping[str, Any] | None, n_images: int
                         ) -> dict[str, np.ndarray] | None:
    """The validated ``{name: float32 [n_images, P]}`` the spec reads (None when it reads none)."""
    names = needed(reducers)
    if not names:
        return None
    who = ", ".join(type(r).__name__ for r in reducers if set(getattr(r, "inputs", ())) & set(names))
    if cfg.model_type not in FAMILIES:
        raise InputError(f"{who} reads reducer_inputs {list(names)}, which only {FAMILIES} models pass to their "
                         f"reducers; this is a {cfg.model_type!r} model")
    if given is not None and not isinstance(given, Mapping):
        raise InputError(f"reducer_inputs must be a mapping name -> array [images, patches], got "
                         f"{type(given).__name__}")
    given = given or {}
    missing = [n for n in names if n not in given]
    if missing:
        raise InputError(f"{who} needs reducer_inputs {missing} (per-image arrays [images, "
                         f"{cfg.vision.num_patches}]) that this call does not pass: it runs only where the data "
                         f"supplies them (the synthvqa benchmark's oracle: the asked object's patches)")
    P = cfg.vision.num_patches
    out = {}
    for n in names:
        a = np.asarray(given[n])
        if a.shape != (n_images, P):
            raise InputError(f"reducer_inputs[{n!r}] has shape {a.shape}; expected ({n_images}, {P}): one row per "
                             f"image, one value per patch")
        if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            raise InputError(f"reducer_inputs[{n!r}] must be numeric, got dtype {a.dtype}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise InputError(f"reducer_inputs[{n!r}] holds non-finite values")
        out[n] = a
    return out

