"""The model-family contract: what a family tells the engine, and the registry of families by ``model_type``.

A family turns its pixel inputs into **visual segments** and says where their tokens go:

* host side -- :meth:`Family.check_visual` validates the pixel inputs against ``input_ids`` and returns
  :class:`VisualInputs` (static-shape pixels, each image's placeholder count, a host layout);
  :meth:`Family.static` folds the reducer chain into a hashable static layout (:class:`FamilyStatic`:
  ``S`` visual slots per image reaching the LLM, ``S_h`` placeholder slots per image in the canonical rows,
  ``V`` in-LLM pool slots per image); :meth:`Family.tables` gives the per-image index arrays the device needs;
* device side -- :meth:`Family.encode` runs the tower (through :func:`jaxprune.engine.vision.clip_segment`),
  the vision- and projector-stage reducers and the projector, and returns the image spans ``[N, S, H]`` with
  their validity, pool roles and source index. The engine places them (one placement for every family),
  runs the decoder with its in-LLM cuts, and decodes.

A family with more than one kind of placeholder (Video-LLaVA: images and videos) also defines
``check_inputs(cfg, text, pixel_values, pixel_values_videos, image_sizes) -> (text, VisualInputs | None)``: it
validates every kind against its own placeholder id and returns the text with all placeholders mapped onto
``image_token_index`` (the engine then sees one kind of span). A family without it refuses ``pixel_values_videos``.

A family registers itself with :func:`register` (one line in its own file).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class VisualInputs:
    """Host-validated visual inputs of one batch."""

    pixel_values: np.ndarray   # family-specific static shape, e.g. [N, C, S, S] or [N, crops, C, S, S]
    span_tokens: np.ndarray    # [N] int: placeholder tokens each image has in ``input_ids`` (HF layout)
    layout: Any = None         # family-specific host layout (NeXT: AnyresLayout)
    image_sizes: np.ndarray | None = None


class FamilyStatic(Protocol):
    """Static (hashable) facts the engine reads from a family's static layout."""

    S: int      # visual slots per image the LLM receives
    S_h: int    # placeholder slots per image in the canonical rows (>= S; the rest is cut on device)
    V: int      # in-LLM pool slots per image
    S_full: int  # slots of an unreduced image span (the family's maximum): the length bucket is taken on it
    ipr: int    # images per row (0 for the unreduced model, which places tokens in HF's layout)


#: ``t2i(tokens [N, K, H], valid [N, K], layers, query_rows) -> [N, K]``: text-to-image attention of a shallow
#: prefill on the full sequence with ``tokens`` in the image spans (provided by the engine).
TextToImage = Callable[[jax.Array, jax.Array, int, int], jax.Array]


class Family(Protocol):
    name: str

    def check_visual(self, cfg, pixel_values, image_sizes, n_image_tokens: int) -> VisualInputs: ...

    def static(self, cfg, reducers: tuple, options: Any, ipr: int, visual: VisualInputs) -> FamilyStatic: ...

    def tables(self, cfg, visual: VisualInputs, st: FamilyStatic) -> dict[str, np.ndarray]: ...

    def encode(self, m, st: FamilyStatic, reducers: tuple, pixel_values: jax.Array, tables: dict,
               text_embeds: jax.Array | None, text_valid: jax.Array | None, t2i: TextToImage | None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]: ...


_FAMILIES: dict[str, Family] = {}


def register(model_type: str, family: Family) -> Family:
    """Make ``family`` the one that runs configs of ``model_type``."""
    _FAMILIES[model_type] = family
    return family


def get(model_type: str) -> Family:
    """The family of ``model_type``; a ValueError names the known ones."""
    if model_type not in _FAMILIES:
        raise ValueError(f"no model family for model_type={model_type!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[model_type]


def names() -> list[str]:
    return sorted(_FAMILIES)
