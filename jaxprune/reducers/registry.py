"""Reducers by name at a budget: what sweeps, benchmarks and the eval CLI use.

``make(name, budget, cfg)`` builds the spec that the papers call "``budget`` tokens" for that method on
LLaVA-1.5 (576 visual tokens; budgets scale with ``cfg.tokens_per_image`` for other towers):

* pre-LLM methods: ``budget`` visual tokens reach the LLM;
* FastV / DART: ``budget`` tokens kept after layer 2 (the convention of the comparison tables);
* multi-cut in-LLM methods (PyramidDrop, VisionDrop, ADSC): ``budget`` = the *average* number of
  visual tokens over the decoder layers.

:func:`jaxprune.flops.prefill_cost` reports the average visual tokens of every spec, so tables
can state both numbers.
"""

from __future__ import annotations

from typing import Callable

from jaxprune.config import LlavaConfig

_FACTORIES: dict[str, Callable[[int, LlavaConfig], object]] = {}


def register(name: str):
    def deco(fn):
        _FACTORIES[name] = fn
        return fn
    return deco


def names() -> list[str]:
    _load()
    return sorted(_FACTORIES)


def make(name: str, budget: int, cfg: LlavaConfig):
    """The spec of reducer ``name`` at ``budget``; unknown names raise a ValueError listing the known ones."""
    _load()
    if name not in _FACTORIES:
        raise ValueError(f"unknown reducer {name!r}; known reducers: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](budget, cfg)


_loaded = False


def _load() -> None:
    """Register every reducer module that is present."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    import jaxprune.reducers as R

    reg = {
        "fastervlm": lambda b, c: R.fastervlm(b),
        "visionzip": lambda b, c: R.visionzip.for_budget(b),
        "fastv": lambda b, c: R.fastv(layer=2, keep=b),
        "adafv": lambda b, c: R.adafv(b),
        "consensusdrop": lambda b, c: R.consensusdrop(b),
        "consensusdrop_proxy": lambda b, c: R.consensusdrop(b, source="proxy"),
        "divprune": lambda b, c: R.divprune(b),
        "random": lambda b, c: R.random_prune(b),
        "dart": lambda b, c: R.dart(layer=2, keep=b),
        "adsc": lambda b, c: R.adsc_schedule(b, num_layers=c.text.num_hidden_layers, total=c.tokens_per_image),
        "adsc_grid": lambda b, c: R.adsc_schedule(b, num_layers=c.text.num_hidden_layers, total=c.tokens_per_image,
                                                  mode="grid"),
        "uniform": lambda b, c: R.uniform(b),
    }
    optional = {
        "visiondrop_vision": ("visiondrop", lambda m, b, c: m.VisionDropVision.for_budget(b)),
    }
    for name, fn in reg.items():
        register(name)(fn)
    for name, (mod, fn) in optional.items():
        try:
            m = importlib.import_module(f"jaxprune.reducers.{mod}")
        except ImportError:
            continue
        register(name)(lambda b, c, m=m, fn=fn: fn(m, b, c))
