"""Visual-token reducers: frozen, hashable specs (static budgets) run by the model at their stage.

    r = jp.reducers.fastervlm(budget=64)
    out = model(input_ids, pixel_values, reducer=r)
    r2 = jp.reducers.compose(jp.reducers.visionzip(dominant=54, contextual=10), jp.reducers.fastv(layer=2, keep=32))

Stages: ``vision`` (inside/after CLIP), ``projector`` (before the LLM), ``llm`` (cuts after decoder
layer K). Low-level primitives live in ``jaxprune.reducers._core``; contexts and return types in
``base`` (pre-LLM) and ``llm`` (in-LLM); ``registry.make(name, budget, cfg)`` builds any reducer by name.

A method is one module of this package: its spec, its factory, its ``registry.register(...)`` line(s) and its
``__all__``. Every public module here is imported when the package is (:func:`_discover`), so the module's
registrations reach :mod:`~jaxprune.reducers.registry` and its ``__all__`` names become ``jaxprune.reducers.<name>``;
adding a file is all it takes. Modules without ``__all__`` (the framework: ``base``, ``llm``, ``compose``,
``options``, ``registry``) export nothing this way; their public names are imported explicitly below.
"""

import importlib
import pkgutil

from jaxprune.reducers._core import (complement_indices, cosine_similarity, gather, masked_softmax, merge_into,
                                     select_topk, uniform_indices)
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, VisionContext
from jaxprune.reducers.compose import Compose, compose
from jaxprune.reducers.llm import LLMContext, LLMReduced
from jaxprune.reducers.options import NextOptions, VideoOptions, next_options, video_options

_FRAMEWORK = ["BudgetError", "Compose", "LLMContext", "LLMReduced", "NextOptions", "ProjectorContext", "Reduced",
              "VideoOptions", "VisionContext", "compose", "next_options", "video_options",
              "complement_indices", "cosine_similarity", "gather", "masked_softmax", "merge_into", "select_topk",
              "uniform_indices"]


def _discover() -> list[str]:
    """Import every public module of the package (sorted by name), then re-export each one's ``__all__``.

    Raises ImportError when two modules export the same name for different objects (a new file silently
    shadowing another method's name would otherwise go unnoticed)."""
    mods = [importlib.import_module(f"{__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
            if not info.name.startswith("_")]
    # second pass: importing a submodule binds its name on the package (``reducers.visionzip`` = the module),
    # so the exported functions of the same name are bound only after every import is done
    exported: dict[str, str] = {n: __name__ for n in _FRAMEWORK}
    for mod in mods:
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if name in exported and globals().get(name) is not obj:
                raise ImportError(f"jaxprune.reducers: {mod.__name__} exports {name!r}, already exported by "
                                  f"{exported[name]}")
            exported.setdefault(name, mod.__name__)
            globals()[name] = obj
    return sorted(exported)


__all__ = _discover()
