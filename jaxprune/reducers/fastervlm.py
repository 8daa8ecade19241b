"""FasterVLM: keep the visual tokens that [CLS] attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning" (arXiv 2412.01818).
Code: Theia-4869/FasterVLM, ``llava/model/llava_arch.py`` (``encode_images``) and the patched CLIP
encoder that returns the CLS attention of the selected layer.
Score: ``s_j = mean_h A_h[CLS, j]`` at the vision feature layer (the layer LLaVA reads, -2), over
patch tokens; keep the top ``budget``, in raster order (kept indices sorted), ties to the lower index.
Positions: renumbered (pre-LLM; the LLM sees a shorter sequence).
Deviations from the official code: selection happens after the projector instead of before; the
projector is per-token, so the kept features are identical. Ties go to the lower index (torch
``topk`` has no defined tie order).

On LLaVA-OneVision (SigLIP, no [CLS]) ``ctx.cls_attn`` holds the CLS-free surrogate: the attention each
patch receives, averaged over its crop's query patches (no official SigLIP path; see
:mod:`jaxprune.families.onevision_spans`, tested in tests/test_reducers_onevision.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxprune.reducers._core import select_topk
from jaxprune.reducers.base import ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register


@dataclasses.dataclass(frozen=True)
class FasterVLM(ReducerBase):
    budget: int
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("FasterVLM.budget", self.budget)

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        scores = ctx.cls_attn.mean(axis=1)  # [N, P]
        idx, ok = select_topk(scores, self.budget, ctx.valid)  # [N, k] sorted
        return Reduced.gather(ctx.features, idx, ok)  # ok: slot holds a valid token


def fastervlm(budget: int) -> FasterVLM:
    return FasterVLM(budget=budget)


register("fastervlm", lambda b, c: fastervlm(b))

__all__ = ["FasterVLM", "fastervlm"]
