"""Visual-token reducers: frozen, hashable specs (static budgets) run by the model at their stage.

    r = jp.reducers.fastervlm(budget=64)
    out = model(input_ids, pixel_values, reducer=r)
    r2 = jp.reducers.compose(jp.reducers.visionzip(dominant=54, contextual=10), jp.reducers.fastv(layer=2, keep=32))

Low-level primitives (``select_topk``, ``gather``, ``merge_into``, ...) live in
``jaxprune.reducers._core``; contexts and the return type in ``jaxprune.reducers.base``.
"""

from jaxprune.reducers._core import (complement_indices, cosine_similarity, gather, merge_into, select_topk,
                                     uniform_indices)
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, VisionContext
from jaxprune.reducers.adafv import AdaFV, adafv
from jaxprune.reducers.adsc import ADSCCut, adsc, adsc_plan, adsc_schedule
from jaxprune.reducers.consensusdrop import ConsensusDrop, consensusdrop
from jaxprune.reducers.controls import Pool, RandomPrune, Uniform, pool, pool2x2, random_prune, uniform
from jaxprune.reducers.dart import DART, dart
from jaxprune.reducers.divprune import DivPrune, divprune
from jaxprune.reducers.fastervlm import FasterVLM, fastervlm
from jaxprune.reducers.fastv import FastV, fastv
from jaxprune.reducers.plan import Compose, compose
from jaxprune.reducers.visiondrop import VisionDropVision, visiondrop_vision
from jaxprune.reducers.visionzip import VisionZip, visionzip

__all__ = ["ADSCCut", "adsc", "adsc_plan", "adsc_schedule", "DART", "dart", "ConsensusDrop", "consensusdrop", "AdaFV", "adafv", "DivPrune", "divprune", "Pool", "RandomPrune", "Uniform", "pool", "pool2x2",
           "random_prune", "uniform", "BudgetError", "Compose", "FasterVLM", "FastV", "ProjectorContext", "Reduced", "VisionContext",
           "VisionDropVision", "VisionZip", "compose", "fastervlm", "fastv", "visiondrop_vision", "visionzip",
           "select_topk", "gather", "merge_into", "cosine_similarity", "complement_indices", "uniform_indices"]
