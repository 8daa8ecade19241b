"""The reducer contract: stages, the contexts a reducer reads, and what it returns.

A reducer is a frozen, hashable dataclass (its budgets are static Python ints) with a ``stage``
and a pure ``__call__(ctx) -> Reduced``. The model calls it at that stage:

* ``"vision"``: inside/after the CLIP tower, on CLIP hidden states *including CLS at index 0*
  (:class:`VisionContext`). It returns CLS + ``patch_budget`` tokens; the tower runs its remaining
  layers (if ``vision_layer`` is below the feature layer) on the reduced set.
* ``"projector"``: after the projector, before the LLM, on projected visual tokens
  (:class:`ProjectorContext`); it returns ``budget`` tokens per image.
* ``"llm"``: after decoder layer ``layer`` (see ``jaxprune.reducers.llm``).

``budget`` is always the number of visual tokens per image that reach the LLM (576 = no
reduction for LLaVA-1.5). Slots a budget cannot fill (too few valid tokens) come back with
``valid=False`` and are masked out of attention downstream. Pre-LLM reducers renumber positions
(the LLM simply sees a shorter sequence), as every pre-LLM method's official code does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError

STAGE_ORDER = {"vision": 0, "projector": 1, "llm": 2}


class BudgetError(JaxpruneError, ValueError):
    """A budget that cannot be honoured (<= 0, or more tokens than the stage has)."""


def check_budget(name: str, value: int, available: int | None = None, *, allow_zero: bool = False) -> int:
    """Validate a static budget; ``available`` = tokens present at that stage (None: checked later)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BudgetError(f"{name} must be a Python int, got {value!r}")
    if value < (0 if allow_zero else 1):
        raise BudgetError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")
    if available is not None and value > available:
        raise BudgetError(f"{name}={value} is larger than the {available} tokens available")
    return value


def _register(cls, data: list[str], meta: list[str] = ()):
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))
    return cls


@dataclasses.dataclass
class VisionContext:
    """CLIP state at the reducer's layer, one row per image (``N`` images, ``P`` patches)."""

    hidden: jax.Array          # [N, 1+P, Dv] layer output, CLS first
    cls_attn: jax.Array        # [N, heads, 1+P] CLS-query softmax attention of that layer
    keys: jax.Array            # [N, 1+P, heads, hd] that layer's keys
    valid: jax.Array           # [N, 1+P] bool (CLS always valid)
    text_embeds: jax.Array     # [N, T, H] LLM input embeddings of the prompt that owns each image
    text_valid: jax.Array      # [N, T] bool: real text tokens (no padding, no image tokens)
    grid: tuple[int, int]      # static patch grid (rows, cols)

    @property
    def num_patches(self) -> int:
        return self.hidden.shape[1] - 1


_register(VisionContext, ["hidden", "cls_attn", "keys", "valid", "text_embeds", "text_valid"], ["grid"])


@dataclasses.dataclass
class ProjectorContext:
    """Projected visual tokens before the LLM, plus every signal pre-LLM reducers use."""

    features: jax.Array        # [N, P, H] projected visual tokens (what the LLM would receive)
    valid: jax.Array           # [N, P] bool
    vision_hidden: jax.Array   # [N, P, Dv] CLIP features at the feature layer (pre-projector)
    cls_attn: jax.Array        # [N, heads, P] CLS-query attention at the feature layer, aligned with features
    keys: jax.Array            # [N, P, heads, hd] CLIP keys at the feature layer, aligned with features
    text_embeds: jax.Array     # [N, T, H]
    text_valid: jax.Array      # [N, T] bool
    text_to_image: jax.Array | None  # [N, P] fp32 query-aware attention from a shallow LLM prefill, if asked
    grid: tuple[int, int]
    #: per-image arrays a reducer declares in ``inputs`` (``model(..., reducer_inputs=...)``), each ``[N, P]`` and
    #: aligned with ``features`` (a slot's value is its source patch's); None when the caller gave none
    inputs: dict[str, jax.Array] | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


_register(ProjectorContext, ["features", "valid", "vision_hidden", "cls_attn", "keys", "text_embeds",
                             "text_valid", "text_to_image", "inputs"], ["grid"])


@dataclasses.dataclass
class Reduced:
    """A reducer's output for one stage: the tokens that go on, where they came from, validity."""

    tokens: jax.Array          # [N, k, D]
    index: jax.Array           # [N, k] int32 source index of each kept token in the stage's input
    valid: jax.Array           # [N, k] bool
    merged_into: jax.Array | None = None  # [N, M] int32: for each dropped token, the kept slot it merged into (-1: none)

    @classmethod
    def gather(cls, x: jax.Array, idx: jax.Array, valid: jax.Array) -> "Reduced":
        """Plain selection: ``x [N, P, D]``, ``idx [N, k]`` -> tokens ``[N, k, D]``."""
        return cls(jnp.take_along_axis(x, idx[..., None], axis=1), idx.astype(jnp.int32), valid)


_register(Reduced, ["tokens", "index", "valid", "merged_into"])


#: the key of a plan's per-image ``tables`` that carries the ``reducer_inputs`` (:mod:`jaxprune.engine.reducer_inputs`)
INPUTS_TABLE_KEY = "reducer_inputs"


def align_inputs(inputs: dict[str, jax.Array] | None, src: jax.Array) -> dict[str, jax.Array] | None:
    """Per-patch reducer inputs ``{name: [N, P]}`` gathered at each current slot's source patch ``src [N, K]``
    (-1: CLS / empty slot, which gets 0) -> ``{name: [N, K]}``; None stays None."""
    if not inputs:
        return None
    safe = jnp.maximum(src, 0)  # [N, K]
    return {k: jnp.where(src >= 0, jnp.take_along_axis(v, safe, axis=1), 0.0) for k, v in inputs.items()}


class ReducerBase:
    """Mixin for reducer specs: stage bookkeeping and budget validation."""

    stage: ClassVar[str] = "projector"
    vision_layer: ClassVar[int | None] = None     # vision stage: HF hidden-state index (None = feature layer)
    shallow_layers: ClassVar[int] = 0            # projector stage: decoder layers of a shallow prefill needed
    #: names of the per-image ``reducer_inputs`` the reducer reads (``ProjectorContext.inputs``): information only
    #: the caller has (the synthvqa oracle's ``patch_prior``); :func:`jaxprune.engine.plan` refuses a call without them
    inputs: ClassVar[tuple[str, ...]] = ()

    def output_tokens(self, available: int) -> int:
        """Visual tokens per image after this reducer, given ``available`` in; validates the budget."""
        return check_budget(f"{type(self).__name__}.budget", self.budget, available)  # type: ignore[attr-defined]

    def per_segment(self, n: int) -> "ReducerBase":
        """This spec with its image budget split over ``n`` segments (anyres crops, video frames) that each run
        it separately: the declared rule that per-segment reductions use, never inferred from field names.

        Default: ``budget // n`` on the dataclass field ``budget`` (:class:`BudgetError` if that leaves no token
        per segment). A spec whose budget is not one ``budget`` field (a dominant/contextual split, a fixed
        pooling output) overrides this; without an override a spec with no ``budget`` field has no rule and
        raises ``NotImplementedError``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"per_segment: n must be a positive Python int, got {n!r}")
        name = type(self).__name__
        fields = {f.name for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else set()
        budget = getattr(self, "budget", None) if "budget" in fields else None
        if budget is None:
            raise NotImplementedError(f"{name} declares no per-segment budget rule (no `budget` field); it must "
                                      f"override per_segment(n)")
        b = budget // n
        if b < 1:
            raise BudgetError(f"{name}.budget={budget} over {n} crops leaves no token per crop")
        return dataclasses.replace(self, budget=b)

    @property
    def stage_order(self) -> int:
        return STAGE_ORDER[self.stage]
