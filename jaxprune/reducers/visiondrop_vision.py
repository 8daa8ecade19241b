"""VisionDrop, stage A (inside CLIP, before the LLM): dominant + contextual visual tokens.

Paper: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (VisionDrop, AAAI 2026,
arXiv 2506.22283). Code: Ruixxxx/VisionDrop @ f7a944497d581aa79570f8f79e8ca91b5347a52f,
``llava/visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``), ``llava/visionzip/utils.py``
(``CLIPAttention_forward``: head-mean keys as ``metric``; ``apply_info``: layer 22),
``llava/visionzip/main.py`` (``visionzip(model, dominant, contextual)``: ``dominant - 1`` patches + CLS),
``llava/eval_visiondrop/model_vqa_loader.py`` and ``scripts/v1_5/visiondrop_eval/*.sh`` (settings).
The stage-A code is VisionZip's (dvlab-research/VisionZip @ 3151f6d, ``visionzip/clip_encoder.py``)
unchanged apart from comments and prints, so this module reuses
:func:`jaxprune.reducers.visionzip.dominant_contextual`; the in-LLM stage B lives elsewhere.

Algorithm (CLIP encoder layer index 22 = ``hidden_states[-2]`` = LLaVA-1.5's feature layer; here the layer
is ``vision_layer``, an HF hidden-states index, default the feature layer):

* Dominant: ``s_j = sum_h A_h[CLS, j]`` over patches; top ``dominant - 1`` patches + CLS, ascending index.
* Contextual: remaining ``R = 1 + P - dominant`` tokens in ascending index order, ``m_i = mean_h k_h[i]``
  (keys ``k_proj(LN1(x))`` of that layer), L2-normalised; targets at remaining positions
  ``i * max(1, R // contextual)``, ``i < contextual``; every other remaining token goes to
  ``argmax_c cos(m_i, m_target_c)``; ``contextual_c = h_target_c + mean_{i -> c} h_i``.
* Output ``[dominant (CLS first) ; contextual]`` = ``dominant + contextual`` tokens to the projector/LLM.

Released LLaVA-1.5-7B setting (the only one): ``--dominant 42 --contextual 6`` (48 tokens enter the LLM),
then stage B ``--layer_list [8,16,24] --image_token_list [[30,5],[22,4],[16,3]]`` (average 32 tokens).
The defaults here are 42 + 6; :meth:`VisionDropVision.for_budget` splits a stage-A token count 7:1
(48 -> 42+6; seeds.md's inferred 96 / 192 / 288 -> 84+12 / 168+24 / 252+36, NOT from the paper).

Position convention: renumbered (pre-LLM).

Our contract (see :mod:`jaxprune.reducers.visionzip`): the output is ``[CLS ; CLS, dominant patches ;
contextual]`` so that the model, which drops slot 0, hands the LLM exactly the official tokens.

Deviations from the official code: those of :mod:`jaxprune.reducers.visionzip` (lower-index ties, float32
scores and merges, norm clamp, masks: the algorithm runs on valid tokens only and unfillable slots come
back ``valid=False``, CLS twice under the "full" feature strategy), plus: ``vision_layer`` may be set
below the feature layer (the official code only acts at ``hidden_states[-2]``); the tower's remaining
layers then run on the reduced tokens, where the two identical CLS copies act as one CLS key with twice
the attention weight (the official code has no such case).

On LLaVA-OneVision: as VisionZip (the CLS-free surrogate, placeholder CLS slot; :mod:`jaxprune.families
.onevision_spans`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxprune.reducers.base import BudgetError, Reduced, ReducerBase, VisionContext, check_budget
from jaxprune.reducers.visionzip import check_split, dominant_contextual, split_per_segment
from jaxprune.reducers.registry import register


@dataclasses.dataclass(frozen=True)
class VisionDropVision(ReducerBase):
    """VisionDrop stage A: ``dominant`` (CLS included) + ``contextual`` tokens after CLIP ``vision_layer``."""

    dominant: int = 42
    contextual: int = 6
    vision_layer: int | None = None  # HF hidden_states index; None = the feature layer (official: -2)
    stage: ClassVar[str] = "vision"

    def __post_init__(self):
        check_split(type(self).__name__, self.dominant, self.contextual)
        if self.vision_layer is not None:
            check_budget(f"{type(self).__name__}.vision_layer", self.vision_layer)

    @property
    def budget(self) -> int:
        """Visual tokens per image that reach the LLM (leave stage A)."""
        return self.dominant + self.contextual

    def output_tokens(self, available: int) -> int:
        return check_split(type(self).__name__, self.dominant, self.contextual, available)

    def __call__(self, ctx: VisionContext) -> Reduced:
        self.output_tokens(ctx.num_patches)
        return dominant_contextual(ctx, self.dominant, self.contextual)

    def per_segment(self, n: int) -> "VisionDropVision":
        """VisionZip's rule: the dominant/contextual split scaled to ``(d + c) // n`` tokens per segment."""
        return split_per_segment(self, n)

    @classmethod
    def for_budget(cls, budget: int, vision_layer: int | None = None) -> "VisionDropVision":
        """Split ``budget`` stage-A tokens in the released 7:1 proportion (42+6 of 48):
        ``contextual = round(budget / 8)`` (half up, >= 1), ``dominant = budget - contextual``."""
        check_budget(f"{cls.__name__}.budget", budget)
        if budget < 2:
            raise BudgetError(f"{cls.__name__}.budget={budget} must be >= 2 (one dominant + one contextual)")
        c = max(1, (budget + 4) // 8)
        return cls(dominant=budget - c, contextual=c, vision_layer=vision_layer)


def visiondrop_vision(dominant: int = 42, contextual: int = 6, vision_layer: int | None = None) -> VisionDropVision:
    """VisionDrop stage A; defaults are the released LLaVA-1.5 setting (42 + 6 at the feature layer)."""
    return VisionDropVision(dominant=dominant, contextual=contextual, vision_layer=vision_layer)


register("visiondrop_vision", lambda b, c: VisionDropVision.for_budget(b))

__all__ = ["VisionDropVision", "visiondrop_vision"]
