"""Reducers by name at a budget: what sweeps, benchmarks and the eval CLI use.

``make(name, budget, cfg)`` builds the spec the papers call "``budget`` tokens" for that method:

* pre-LLM methods: ``budget`` visual tokens per image reach the LLM;
* FastV / DART: ``budget`` tokens kept after layer 2 (the convention of the comparison tables;
  DART's official count rule adds its 4 image pivots: 64 -> 68);
* multi-cut in-LLM methods (PyramidDrop, VisionDrop, ADSC): ``budget`` = the *average* number of
  visual tokens over the decoder layers (cut layers scale with ``cfg``'s depth). Averages a shallow
  decoder cannot reach raise :class:`~jaxprune.reducers.base.BudgetError`;
* ``pyramiddrop_final`` / ``adsc_final``: the same cut layers, but ``budget`` = the visual tokens left
  after the *last* cut, reached geometrically (cut ``s`` of ``m`` keeps ``round(N * (budget/N)^(s/m))``,
  PyramidDrop's constant-ratio shape). Every ``1 <= budget < N`` is reachable at any depth, so shallow
  models (the 4-layer synthetic-VQA LLaVA) get a row at every budget; a table must say which kind it uses.

``budget`` is an absolute count for ``cfg``'s tower (576 tokens for LLaVA-1.5); pass the equivalent
count for other towers. :func:`jaxprune.flops.prefill_cost` reports every spec's average visual
tokens over layers, so tables can state both numbers.
"""

from __future__ import annotations

import numbers
from typing import Callable

from jaxprune import reducers as R
from jaxprune.config import LlavaConfig


def _depth(c: LlavaConfig) -> int:
    return c.text.num_hidden_layers


def final_keeps(budget: int, total: int, cuts: int) -> tuple[int, ...]:
    """Non-increasing counts after ``cuts`` cuts, geometric from ``total`` and ending exactly at ``budget``:
    ``round(total * (budget / total) ** (s / cuts))`` for ``s = 1..cuts`` (never below ``budget``)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 1 <= budget < total:
        raise R.BudgetError(f"final-token budget {budget!r} must be an integer in [1, {total}) (the visual "
                            f"tokens of one image)")
    budget = int(budget)
    keeps, prev = [], total
    for s in range(1, cuts + 1):
        k = budget if s == cuts else round(total * (budget / total) ** (s / cuts))
        prev = min(prev, max(budget, k))
        keeps.append(prev)
    return tuple(keeps)


def _pyramiddrop_final(b: int, c: LlavaConfig):
    from jaxprune.reducers.adsc import _drop_noops
    from jaxprune.reducers.pyramiddrop import AVERAGE_LAYERS, PyramidDropCut, scale_layers

    layers = scale_layers(AVERAGE_LAYERS, _depth(c))
    layers, keeps = _drop_noops(layers, final_keeps(b, c.tokens_per_image, len(layers)), c.tokens_per_image)
    return R.compose(*(PyramidDropCut(layer=l, keep=k) for l, k in zip(layers, keeps)))


def _adsc_final(b: int, c: LlavaConfig):
    from jaxprune.reducers.adsc import _drop_noops, default_layers

    layers = default_layers(_depth(c))
    return R.adsc(*_drop_noops(layers, final_keeps(b, c.tokens_per_image, len(layers)), c.tokens_per_image))


_FACTORIES: dict[str, Callable[[int, LlavaConfig], object]] = {
    "fastervlm": lambda b, c: R.fastervlm(b),
    "visionzip": lambda b, c: R.visionzip.for_budget(b),
    "visiondrop_vision": lambda b, c: R.VisionDropVision.for_budget(b),
    "adafv": lambda b, c: R.adafv(b),
    "divprune": lambda b, c: R.divprune(b),
    "consensusdrop": lambda b, c: R.consensusdrop(b),
    "consensusdrop_proxy": lambda b, c: R.consensusdrop(b, source="proxy"),
    "random": lambda b, c: R.random_prune(b),
    "uniform": lambda b, c: R.uniform(b),
    "fastv": lambda b, c: R.fastv(layer=2, keep=b),
    "dart": lambda b, c: R.dart(layer=2, keep=b),
    "pyramiddrop": lambda b, c: R.pyramiddrop_for_average(b, num_layers=_depth(c), total=c.tokens_per_image),
    "visiondrop": lambda b, c: R.visiondrop_schedule(b, num_layers=_depth(c)),
    "adsc": lambda b, c: R.adsc_schedule(b, num_layers=_depth(c), total=c.tokens_per_image),
    "pyramiddrop_final": _pyramiddrop_final,
    "adsc_final": _adsc_final,
    "adsc_grid": lambda b, c: R.adsc_schedule(b, num_layers=_depth(c), total=c.tokens_per_image, mode="grid"),
}


def register(name: str, factory: Callable[[int, LlavaConfig], object]) -> None:
    """Add a reducer under ``name`` (``factory(budget, cfg) -> spec``)."""
    _FACTORIES[name] = factory


def names() -> list[str]:
    return sorted(_FACTORIES)


def make(name: str, budget: int, cfg: LlavaConfig):
    """The spec of reducer ``name`` at ``budget``; unknown names raise a ValueError listing the known ones."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reducer {name!r}; known reducers: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](budget, cfg)
