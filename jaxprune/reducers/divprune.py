"""DivPrune: keep a maximally diverse subset of the projected visual tokens (greedy max-min).

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR'25,
arXiv 2503.02175). Code: vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6,
``LLaVA/llava/model/llava_arch.py``: ``DivPrune`` and ``pairwise_cosine_similarity``, called at the
end of ``prepare_inputs_labels_for_multimodal`` when ``LAYER_INDEX=0``.

Feature space: the projected visual tokens (the LLM's input embeddings of the image,
``new_input_embeds[0][35:35+576]``), i.e. ``ctx.features``.
Distance: ``D[i, j] = 1 - cos(v_i, v_j)`` with ``cos`` from unit-normalised vectors (``v / ||v||``).
Greedy selection of ``budget`` tokens ``s_0, s_1, ...``:
  * first pick: ``s_0 = argmax_j q_j`` where ``q_j`` is the *second smallest* entry of column
    ``j`` of ``D`` (``topk(D, 2, dim=0, largest=False).values[1]``; the smallest is the token's
    distance to itself, so ``q_j`` is its distance to its nearest neighbour);
  * then ``s_i = argmax_j min_{t < i} D[s_t, j]`` (the running minimum over the selected rows).
  ``argmax`` takes the first maximum (lower index on ties).
Output order: as the code, the kept indices are sorted ascending (``keep_indexs.sort()``), so the
LLM sees the kept tokens in raster order, not in selection order.
Positions: renumbered (pre-LLM; the LLM sees a shorter sequence, as the official code's
``new_input_embeds[:, keep_indexs]`` with position ids recomputed by ``generate``).

Deviations from the official code:
  * The budget is a token count; the official takes ``SUBSET_RATIO`` and keeps
    ``round(ratio * 576)`` tokens (ratio 0.098 -> 56).
  * Per image: the official selects on batch row 0 only (with the hard-coded 35-token system
    prefix) and applies the same indices to the whole batch (batch size 1 in its evaluation);
    here every image gets its own selection.
  * Already-selected tokens are excluded from later picks. The official re-scores every token;
    a selected token scores ``min_t D[s_t, j] <= D[j, j] ~ 0``, so it could only be picked
    again when every remaining token is an exact duplicate (distance <= the rounding of
    ``1 - cos(v, v)``); then the official feeds a token twice, we take the next (lowest-index)
    unselected one.
  * Masks: invalid tokens are ignored as rows of ``D`` (the first-pick nearest-neighbour distance
    is over valid tokens only; a token with no valid neighbour scores ``+inf``) and are never
    picked while a valid one remains; unfillable slots point at the lowest-index unselected
    invalid tokens and come back ``valid=False``, after the valid ones.
  * Computed in float32 with ``Precision.HIGHEST`` (the official runs in the model dtype, fp16);
    the norm is clamped at 1e-6 (``_core.cosine_similarity``), so an all-zero vector has
    similarity 0 instead of NaN.
  * LLaVA-NeXT (the official selects over the whole concatenated anyres feature, newline tokens
    included) is not covered: the projector stage here runs per image.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from jaxprune.reducers._core import cosine_similarity
from jaxprune.reducers.base import ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register


@dataclasses.dataclass(frozen=True)
class DivPrune(ReducerBase):
    budget: int
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("DivPrune.budget", self.budget)

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        k = self.budget
        n, p = ctx.valid.shape
        check_budget("DivPrune.budget", k, p)
        valid = ctx.valid  # [N, P]
        dist = 1.0 - cosine_similarity(ctx.features, ctx.features)  # [N, P(rows i), P(cols j)] f32
        inf = jnp.asarray(jnp.inf, dist.dtype)
        rows_ok = valid[:, :, None]  # [N, P, 1]: invalid tokens are not rows of D

        # first pick: second smallest of each column over valid rows (nearest-neighbour distance)
        if p >= 2:
            col = jnp.where(rows_ok, dist, inf).swapaxes(1, 2)  # [N, P(j), P(i)]
            # second smallest with multiplicity (= topk(2, largest=False)[1]) by two reductions (no sort)
            first = jnp.argmin(col, axis=-1)  # [N, P]
            q = jnp.min(jnp.where(jnp.arange(p)[None, None, :] == first[..., None], inf, col), axis=-1)
        else:
            q = jnp.full((n, p), inf)

        def pick(score, taken):  # [N, P], [N, P] -> [N] first argmax among valid untaken, else fallback
            free = valid & ~taken  # [N, P]
            best = jnp.argmax(jnp.where(free, score, -inf), axis=1).astype(jnp.int32)  # [N]
            fallback = jnp.argmax(~taken, axis=1).astype(jnp.int32)  # lowest-index untaken token
            has = jnp.any(free, axis=1)  # [N]
            return jnp.where(has, best, fallback), has

        rows = jnp.arange(n)
        taken0 = jnp.zeros((n, p), bool)
        s0, ok0 = pick(q, taken0)  # [N]
        order = jnp.zeros((n, k), jnp.int32).at[:, 0].set(s0)  # [N, k] selection order
        oks = jnp.zeros((n, k), bool).at[:, 0].set(ok0)  # [N, k]
        mind = dist[rows, s0]  # [N, P] min over selected rows of D[s, :]
        taken = taken0.at[rows, s0].set(True)

        def body(i, carry):
            mind, taken, order, oks = carry
            s, ok = pick(mind, taken)  # [N]
            mind = jnp.minimum(mind, dist[rows, s])  # [N, P]
            return mind, taken.at[rows, s].set(True), order.at[:, i].set(s), oks.at[:, i].set(ok)

        _, _, order, oks = lax.fori_loop(1, k, body, (mind, taken, order, oks))
        # output: valid picks ascending (raster order, as keep_indexs.sort()), then the fillers
        key = jnp.sort(jnp.where(oks, order, order + p), axis=1)  # [N, k]
        idx = jnp.where(key >= p, key - p, key)  # [N, k]
        return Reduced.gather(ctx.features, idx, key < p)  # [N, k, H]


def divprune(budget: int) -> DivPrune:
    """Keep ``budget`` maximally diverse projected visual tokens per image (greedy max-min 1 - cos)."""
    return DivPrune(budget=budget)


register("divprune", lambda b, c: divprune(b))

__all__ = ["DivPrune", "divprune"]
