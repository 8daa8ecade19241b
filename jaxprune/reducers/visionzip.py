"""VisionZip: dominant tokens by [CLS] attention, plus contextual tokens merged by key similarity.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (arXiv 2412.04467).
Code: dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02,
``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``), ``visionzip/utils.py``
(``CLIPAttention_forward`` returns ``raw_key_states.mean(1)`` as ``metric``; ``apply_info`` records
it at encoder layer 22 = the LLaVA feature layer ``hidden_states[-2]``) and ``visionzip/main.py``
(``visionzip(model, dominant, contextual)`` passes ``dominant - 1``: CLS is one of the dominant tokens).

Algorithm (one image; ``h`` = CLIP hidden states at the feature layer, CLS at 0; ``A_h`` = that layer's
softmax attention; ``k_h`` = its keys ``k_proj(LN1(x))``, head ``h``):

* Dominant: ``s_j = sum_h A_h[CLS, j]`` for patches ``j >= 1``; the top ``dominant - 1`` patches plus CLS,
  in ascending index order (``masked_select``), CLS first.
* Contextual: the ``R = 1 + P - dominant`` remaining tokens in ascending index order; ``m_i = mean_h k_h[i]``,
  L2-normalised. ``step = max(1, R // contextual)``; targets are remaining positions
  ``arange(0, R, step)[:contextual]``. Every other remaining token goes to
  ``argmax_c cos(m_i, m_target_c)`` (first maximum on ties) and
  ``contextual_c = h_target_c + mean_{i -> c} h_i`` (just ``h_target_c`` if nothing is assigned).
* Output (what the official tower hands to the projector): ``[dominant (CLS first) ; contextual]``,
  ``dominant + contextual`` tokens; the projected CLS feature reaches the LLM.

LLaVA-1.5 settings: 64 = 54 + 10 (official README), 128 = 108 + 20, 192 = 162 + 30 (paper; the split is
``contextual = budget * 5 / 32``, see :meth:`VisionZip.for_budget`).

Position convention: renumbered (pre-LLM; the LLM sees a shorter visual span).

Our contract and the official output: a "vision" reducer must return CLS at index 0 followed by the
tokens that go on, and the model then drops index 0 under LLaVA's ``"default"`` feature selection.
So the output here is ``[CLS ; CLS, dominant patches ; contextual]``: the first CLS is the slot the
model drops, the second is the official dominant CLS, and the LLM receives exactly the official
``dominant + contextual`` tokens in the official order (``output_tokens`` returns that count; the CLS
slot's ``kept`` index in the model output is -1, as for any CLS).

Deviations from the official code:
  * Ties (CLS attention and cosine) go to the lower index (``torch.topk`` has no defined tie order;
    ``argmax`` already takes the first maximum).
  * Scores, similarities and merge sums are float32 (``Precision.HIGHEST``); merged tokens are cast back
    to the hidden dtype. The official code computes them in the tower's dtype (fp16 on GPU).
  * Key norms are clamped at 1e-6 (``_core.cosine_similarity``): a zero key gives similarity 0, not NaN.
  * Masks (the official code has none): the algorithm runs on the valid tokens only, exactly as if the
    image had only those tokens (invalid patches are never dominant, never targets and never merged;
    ``R`` and ``step`` count valid remaining tokens). Slots that cannot be filled (fewer valid patches
    than ``dominant - 1``, or fewer valid remaining tokens than ``contextual``, where the official code
    would fail) come back ``valid=False``. CLS is always valid.
  * With ``vision_feature_select_strategy="full"`` (not LLaVA-1.5/NeXT) the LLM would see CLS twice.
  * ``merged_into`` is not filled (None).

On LLaVA-OneVision (SigLIP, no [CLS]) the dominant tokens rank by the CLS-free surrogate (attention each patch
receives, averaged over the crop's queries) in a placeholder-CLS context whose CLS slot is dropped and given to
one more dominant patch (the official code @ 3151f6d has no SigLIP path; :mod:`jaxprune.families.onevision_spans`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxprune.reducers._core import (assign_argmax, complement_indices, cosine_similarity, gather, merge_into,
                                     select_topk)
from jaxprune.reducers.base import BudgetError, Reduced, ReducerBase, VisionContext, check_budget
from jaxprune.reducers.registry import register


def check_split(name: str, dominant: int, contextual: int, patches: int | None = None) -> int:
    """Validate a dominant (incl. CLS) + contextual split against ``patches`` tokens; returns the sum."""
    check_budget(f"{name}.dominant", dominant, None if patches is None else patches + 1)
    check_budget(f"{name}.contextual", contextual, None if patches is None else patches + 1 - dominant)
    return dominant + contextual


def dominant_contextual(ctx: VisionContext, dominant: int, contextual: int) -> Reduced:
    """The shared VisionZip / VisionDrop-stage-A reduction (see the module docstring).

    Returns ``1 + dominant + contextual`` tokens: ``[CLS ; CLS, dominant patches ; contextual]``.
    """
    n, s = ctx.valid.shape  # s = 1 + P
    d, c = dominant, contextual
    r = s - d  # remaining tokens (static)
    hidden = ctx.hidden  # [N, S, Dv]
    valid = ctx.valid  # [N, S]
    zero = jnp.zeros((n, 1), jnp.int32)
    true = jnp.ones((n, 1), bool)

    # ---- dominant: CLS + top (d - 1) patches by head-summed CLS attention, ascending index
    if d > 1:
        score = ctx.cls_attn[:, :, 1:].astype(jnp.float32).sum(axis=1)  # [N, P]
        top, top_ok = select_topk(score, d - 1, valid[:, 1:])  # [N, d-1] ascending (valid first)
        dom = jnp.concatenate([zero, top + 1], axis=1)  # [N, d]
        dom_ok = jnp.concatenate([true, top_ok], axis=1)  # [N, d]
    else:
        dom, dom_ok = zero, true

    # ---- remaining tokens: valid ones first, each group in ascending index order
    rest, rest_ok = complement_indices(dom, s, valid)  # [N, r]
    order = jnp.argsort(~rest_ok, axis=1, stable=True)  # [N, r]
    rest = jnp.take_along_axis(rest, order, axis=1)  # [N, r]
    rest_ok = jnp.take_along_axis(rest_ok, order, axis=1)  # [N, r] prefix mask
    n_rest = rest_ok.sum(axis=1, dtype=jnp.int32)[:, None]  # [N, 1]

    # ---- contextual targets: positions i * step (i < c) of the valid remaining list
    step = jnp.maximum(n_rest // c, 1)  # [N, 1]
    tpos = jnp.arange(c, dtype=jnp.int32)[None, :] * step  # [N, c]
    tgt_ok = tpos < n_rest  # [N, c]
    tgt = jnp.take_along_axis(rest, jnp.minimum(tpos, r - 1), axis=1)  # [N, c]
    pos = jnp.arange(r, dtype=jnp.int32)[None, :]  # [1, r]
    is_tgt = rest_ok & (pos % step == 0) & (pos // step < c)  # [N, r]

    # ---- assign every other valid remaining token to its most similar target (head-mean keys)
    metric = ctx.keys.astype(jnp.float32).mean(axis=2)  # [N, S, hd]
    sim = cosine_similarity(gather(metric, rest), gather(metric, tgt))  # [N, r, c]
    assign = assign_argmax(sim, tgt_ok)  # [N, r]
    ctx_tokens = merge_into(gather(hidden, tgt), gather(hidden, rest), assign,
                            dropped_valid=rest_ok & ~is_tgt, mode="target_plus_mean")  # [N, c, Dv]

    tokens = jnp.concatenate([hidden[:, :1], gather(hidden, dom), ctx_tokens], axis=1)  # [N, 1+d+c, Dv]
    index = jnp.concatenate([zero, dom, tgt], axis=1)  # [N, 1+d+c]
    ok = jnp.concatenate([true, dom_ok, tgt_ok], axis=1)  # [N, 1+d+c]
    return Reduced(tokens=tokens, index=index, valid=ok)


def split_per_segment(spec, n: int):
    """``spec`` (a dominant incl. CLS + contextual split) with its total ``t = (d + c) // n`` per segment, the
    ratio kept: ``c' = max(1, round_half_up(c * t / (d + c)))`` (at most ``t - 1``), ``d' = t - c'``
    (540 + 100 over 5 crops -> 108 + 20, the LLaVA-1.5 split of 128). :class:`BudgetError` if ``t < 2``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_segment: n must be a positive Python int, got {n!r}")
    name = type(spec).__name__
    d, c = spec.dominant, spec.contextual
    t = (d + c) // n
    if t < 2:
        raise BudgetError(f"{name}: dominant={d} + contextual={c} over {n} crops leaves {t} token(s) per crop; "
                          "a per-crop split needs >= 2 (one dominant incl. CLS + one contextual)")
    c2 = max(1, (2 * c * t + (d + c)) // (2 * (d + c)))  # round half up of c * t / (d + c)
    c2 = min(c2, t - 1)
    return dataclasses.replace(spec, dominant=t - c2, contextual=c2)


@dataclasses.dataclass(frozen=True)
class VisionZip(ReducerBase):
    """``dominant`` tokens (CLS included) + ``contextual`` merged tokens at the CLIP feature layer."""

    dominant: int
    contextual: int
    stage: ClassVar[str] = "vision"

    def __post_init__(self):
        check_split(type(self).__name__, self.dominant, self.contextual)

    @property
    def budget(self) -> int:
        """Visual tokens per image that reach the LLM."""
        return self.dominant + self.contextual

    def output_tokens(self, available: int) -> int:
        return check_split(type(self).__name__, self.dominant, self.contextual, available)

    def __call__(self, ctx: VisionContext) -> Reduced:
        self.output_tokens(ctx.num_patches)
        return dominant_contextual(ctx, self.dominant, self.contextual)

    def per_segment(self, n: int) -> "VisionZip":
        """The dominant/contextual split scaled to ``(d + c) // n`` tokens per segment (:func:`split_per_segment`)."""
        return split_per_segment(self, n)

    @classmethod
    def for_budget(cls, budget: int) -> "VisionZip":
        """The official split of a total budget: ``contextual = round(budget * 5 / 32)`` (half up, >= 1),
        ``dominant = budget - contextual``; gives 54+10 / 108+20 / 162+30 for 64 / 128 / 192."""
        check_budget(f"{cls.__name__}.budget", budget)
        if budget < 2:
            raise BudgetError(f"{cls.__name__}.budget={budget} must be >= 2 (one dominant + one contextual)")
        c = max(1, (5 * budget + 16) // 32)
        return cls(dominant=budget - c, contextual=c)


def visionzip(dominant: int, contextual: int) -> VisionZip:
    """``visionzip(dominant=54, contextual=10)``: 64 visual tokens (CLS + 53 patches + 10 merged)."""
    return VisionZip(dominant=dominant, contextual=contextual)


visionzip.for_budget = VisionZip.for_budget  # type: ignore[attr-defined]
register("visionzip", lambda b, c: VisionZip.for_budget(b))

__all__ = ["VisionZip", "visionzip", "dominant_contextual", "check_split"]
