"""Reducers by name at a budget: what sweeps, benchmarks and the eval CLI use.

This module is only the mechanism. Each method file registers its own factories, next to its spec::

    register("fastv", lambda b, c: fastv(layer=2, keep=b))

    @register("adsc_final")
    def _adsc_final(budget, cfg): ...

and :mod:`jaxprune.reducers` imports every method module of the package at import time, so adding a file
is enough for :func:`names` / :func:`make` to see its reducers (``from jaxprune.reducers import registry``
always runs that discovery first).

``make(name, budget, cfg)`` builds the spec the papers call "``budget`` tokens" for that method:

* pre-LLM methods: ``budget`` visual tokens per image reach the LLM;
* FastV / DART: ``budget`` tokens kept after layer 2 (the convention of the comparison tables;
  DART's official count rule adds its 4 image pivots: 64 -> 68);
* multi-cut in-LLM methods (PyramidDrop, VisionDrop, ADSC): ``budget`` = the *average* number of
  visual tokens over the decoder layers (cut layers scale with ``cfg``'s depth). Averages a shallow
  decoder cannot reach raise :class:`~jaxprune.reducers.base.BudgetError`;
* ``pyramiddrop_final`` / ``adsc_final``: the same cut layers, but ``budget`` = the visual tokens left
  after the *last* cut, reached geometrically (:func:`final_keeps`: cut ``s`` of ``m`` keeps
  ``round(N * (budget/N)^(s/m))``, PyramidDrop's constant-ratio shape). Every ``1 <= budget < N`` is
  reachable at any depth, so shallow models (the 4-layer synthetic-VQA LLaVA) get a row at every budget; a
  table must say which kind it uses.

``budget`` is an absolute count for ``cfg``'s tower (576 tokens for LLaVA-1.5); pass the equivalent
count for other towers. :func:`jaxprune.flops.prefill_cost` reports every spec's average visual
tokens over layers, so tables can state both numbers.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from jaxprune.reducers.base import BudgetError

Factory = Callable[[int, Any], Any]  # (budget, LlavaConfig) -> spec

_FACTORIES: dict[str, Factory] = {}
_MODEL_TYPES: dict[str, tuple[str, ...]] = {}  # name -> the only model types it applies to (absent: every one)
_BENCHMARKS: dict[str, tuple[str, ...]] = {}   # name -> the only benchmarks that supply its inputs (absent: any)


def register(name: str, factory: Factory | None = None, model_types: tuple[str, ...] | None = None,
             benchmarks: tuple[str, ...] | None = None):
    """Add a reducer under ``name``: ``register(name, factory)``, or ``@register(name)`` on a
    ``factory(budget, cfg) -> spec`` function (returned unchanged). A later registration of the same name
    replaces the earlier one (experiments register variants at run time). ``model_types``: the only families
    the method applies to (DyCoke: ``("video_llava",)``); its factory refuses the others by name, and
    ``names(model_type)`` leaves it out for them. ``benchmarks``: the only benchmarks the method runs on, because
    it reads ``reducer_inputs`` only they supply (the synthvqa ``oracle``); :func:`names` lists it only when asked
    for one of them."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"reducer name must be a non-empty str, got {name!r}")
    if factory is None:
        def decorator(f: Factory) -> Factory:
            register(name, f, model_types, benchmarks)
            return f

        return decorator
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable as factory(budget, cfg), got {factory!r}")
    _FACTORIES[name] = factory
    for table, value in ((_MODEL_TYPES, model_types), (_BENCHMARKS, benchmarks)):
        if value is None:
            table.pop(name, None)
        else:
            table[name] = tuple(value)
    return factory


def names(model_type: str | None = None, benchmark: str | None = None) -> list[str]:
    """The registered names that run anywhere (with ``model_type``: on that family), plus, with ``benchmark``, the
    benchmark-only ones that benchmark supplies (:func:`benchmarks_of`)."""
    return sorted(n for n in _FACTORIES
                  if (model_type is None or model_type in _MODEL_TYPES.get(n, (model_type,)))
                  and (n not in _BENCHMARKS or benchmark in _BENCHMARKS[n]))


def benchmark_only() -> dict[str, tuple[str, ...]]:
    """Every benchmark-only reducer name -> the benchmarks it runs on (left out of :func:`names` by default)."""
    return {n: _BENCHMARKS[n] for n in sorted(_BENCHMARKS) if n in _FACTORIES}


def benchmarks_of(name: str) -> tuple[str, ...] | None:
    """The only benchmarks reducer ``name`` runs on (None: any; a ValueError for an unknown name)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reducer {name!r}; known reducers: {', '.join(sorted(_FACTORIES))}")
    return _BENCHMARKS.get(name)


def make(name: str, budget: int, cfg):
    """The spec of reducer ``name`` at ``budget``; unknown names raise a ValueError listing the known ones."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reducer {name!r}; known reducers: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](budget, cfg)


def visual_tokens(cfg) -> int:
    """The unreduced visual tokens of one image that a budget counts against: LLaVA-1.5's ``tokens_per_image``
    (576); LLaVA-NeXT's packed maximum incl. newlines (2928 for llava-v1.6: the in-LLM pool of
    :func:`jaxprune.families.llava_next.visual_pool`). Totals of the average / final-budget schedules use it."""
    return cfg.max_image_tokens


def final_keeps(budget: int, total: int, cuts: int) -> tuple[int, ...]:
    """Non-increasing counts after ``cuts`` cuts, geometric from ``total`` and ending exactly at ``budget``:
    ``round(total * (budget / total) ** (s / cuts))`` for ``s = 1..cuts`` (never below ``budget``)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 1 <= budget < total:
        raise BudgetError(f"final-token budget {budget!r} must be an integer in [1, {total}) (the visual "
                          f"tokens of one image)")
    budget = int(budget)
    keeps, prev = [], total
    for s in range(1, cuts + 1):
        k = budget if s == cuts else round(total * (budget / total) ** (s / cuts))
        prev = min(prev, max(budget, k))
        keeps.append(prev)
    return tuple(keeps)

