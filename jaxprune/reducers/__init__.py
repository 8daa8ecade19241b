"""Visual-token reducers: frozen, hashable specs (static budgets) run by the model at their stage.

    r = jp.reducers.fastervlm(budget=64)
    out = model(input_ids, pixel_values, reducer=r)
    r2 = jp.reducers.compose(jp.reducers.visionzip(dominant=54, contextual=10), jp.reducers.fastv(layer=2, keep=32))

Stages: ``vision`` (inside/after CLIP), ``projector`` (before the LLM), ``llm`` (cuts after decoder
layer K). Low-level primitives live in ``jaxprune.reducers._core``; contexts and return types in
``base`` (pre-LLM) and ``llm`` (in-LLM); ``registry.make(name, budget, cfg)`` builds any reducer by name.
"""

from jaxprune.reducers._core import (complement_indices, cosine_similarity, gather, merge_into, select_topk,
                                     uniform_indices)
from jaxprune.reducers.adafv import AdaFV, adafv
from jaxprune.reducers.adsc import ADSCCut, adsc, adsc_plan, adsc_schedule
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, VisionContext
from jaxprune.reducers.consensusdrop import ConsensusDrop, consensusdrop
from jaxprune.reducers.controls import Pool, RandomPrune, Uniform, pool, pool2x2, random_prune, uniform
from jaxprune.reducers.dart import DART, dart
from jaxprune.reducers.divprune import DivPrune, divprune
from jaxprune.reducers.fastervlm import FasterVLM, fastervlm
from jaxprune.reducers.fastv import FastV, fastv
from jaxprune.reducers.llm import LLMContext, LLMReduced
from jaxprune.reducers.compose import Compose, compose
from jaxprune.reducers.options import NextOptions, next_options
from jaxprune.reducers.pyramiddrop import PyramidDropCut, pyramiddrop, pyramiddrop_for_average
from jaxprune.reducers.visiondrop_llm import (VisionDropCut, visiondrop, visiondrop_llm, visiondrop_released,
                                              visiondrop_schedule)
from jaxprune.reducers.visiondrop_vision import VisionDropVision, visiondrop_vision
from jaxprune.reducers.visionzip import VisionZip, visionzip

__all__ = [
    "ADSCCut", "AdaFV", "BudgetError", "Compose", "ConsensusDrop", "DART", "DivPrune", "FastV", "FasterVLM",
    "LLMContext", "LLMReduced", "NextOptions", "next_options", "Pool", "ProjectorContext", "PyramidDropCut", "RandomPrune", "Reduced", "Uniform",
    "VisionContext", "VisionDropCut", "VisionDropVision", "VisionZip", "adafv", "adsc", "adsc_plan",
    "adsc_schedule", "compose", "consensusdrop", "dart", "divprune", "fastervlm", "fastv", "pool", "pool2x2",
    "pyramiddrop", "pyramiddrop_for_average", "random_prune", "uniform", "visiondrop", "visiondrop_llm",
    "visiondrop_released", "visiondrop_schedule", "visiondrop_vision", "visionzip",
    "complement_indices", "cosine_similarity", "gather", "merge_into", "select_topk", "uniform_indices",
]
