"""Chaining reducers: :func:`compose` builds one spec that applies several stages in pipeline order."""

from __future__ import annotations

import dataclasses

from jaxprune.reducers.base import STAGE_ORDER


@dataclasses.dataclass(frozen=True)
class Compose:
    """Reducers applied in stage order (vision -> projector -> llm); build with :func:`compose`."""

    reducers: tuple

    @property
    def stage(self) -> str:
        return "compose"


def compose(*reducers) -> Compose:
    """Chain reducers functionally: ``compose(visionzip(54, 10), fastv(layer=2, keep=32))``.

    Stages must be given in pipeline order (vision, projector, llm; LLM cuts by increasing layer)."""
    flat: list = []
    for r in reducers:
        flat.extend(r.reducers if isinstance(r, Compose) else (r,))
    if not flat:
        raise ValueError("compose() needs at least one reducer")
    keys = [(STAGE_ORDER[r.stage], getattr(r, "layer", 0) or 0) for r in flat]
    if keys != sorted(keys):
        raise ValueError("compose(): reducers must be given in pipeline order (vision, projector, then llm by "
                         f"layer); got stages {[r.stage for r in flat]}")
    return Compose(tuple(flat))


def as_tuple(reducer) -> tuple:
    return reducer.reducers if isinstance(reducer, Compose) else (reducer,)
