"""LLaVA-PruMerge+: IQR-outlier tokens by [CLS] attention plus a spatially uniform grid, each kept token
absorbing its key-nearest neighbours, and one extra token summarising everything pruned.

Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang, Cai, Xu, Lee,
Yan; arXiv 2403.15388, ICCV 2025). Code: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a
(the file last changed in 5632f5ad), ``llava/model/multimodal_encoder/clip_encoder.py``:
``CLIPVisionTower.token_prune_merge_advanced_plus`` (what ``forward`` calls, ``if_adaptive=True``) and
``outlier_dectection``.

Official algorithm (one image, ``N`` = 576 patches; ``a_j`` = [CLS] attention of patch ``j``, ``k_j`` = its key,
``x_j`` = its CLIP feature ``hidden_states[-2]``):

1. Outliers: ``ratio = #{j : a_j > Q3 + 1.5 IQR} / N`` (``np.percentile`` 25 / 75, linear); the
   ``int(N * ratio)`` highest ``a_j`` (``torch.topk``, sorted by descending attention).
2. Spatial picks: ``step_length = int(1 / ratio)``; ``arange(0, 575, int(step_length / 3))`` minus the outliers,
   ascending, appended after them (about 4x as many tokens again: ~32 outliers + ~96 grid tokens on LLaVA-1.5).
3. Merge: every kept token ``i`` takes the 32 tokens (kept or not, itself excluded) with the highest cosine
   similarity of keys (``F.normalize``) and becomes ``x_i + sum_nbr a_nbr x_nbr`` (the weighted sum is not
   normalised: ``#/ torch.sum(weights)`` is commented out; the paper describes a weighted average).
4. One extra token ``sum_{j not kept} a_j x_j`` after the kept ones. Output: ``[outliers ; grid ; extra]``.

Static budget (the official output size is data dependent): ``budget`` = visual tokens per image that reach the
LLM, the extra token included, so ``K = budget - 1`` kept slots + 1 extra slot, always. The kept set is the
official one, fitted to ``K``:

* the ``min(#outliers, K)`` highest-attention outliers;
* ``m = K - that`` grid slots: if the official grid has ``g >= m`` tokens, ``m`` of them evenly spaced over the
  grid's ranks (``floor(i g / m)``); when ``g == m`` this is exactly the official grid, so at the official count
  (``budget = |official kept| + 1``) the output is exactly the official one;
* if ``g < m``: ``fill="uniform"`` (default) adds ``m - g`` tokens evenly spaced over the ranks of the remaining
  valid tokens (raster order), so every image gets exactly ``budget`` tokens -- comparable with the other
  methods at equal cost; ``fill="mask"`` leaves those slots ``valid=False``, i.e. the official adaptive count,
  capped at ``budget`` (``budget = P``: the official PruMerge+ in a static span of ``P`` slots, unless the
  official keeps all ``P`` tokens).

Output order: ``order="raster"`` (default, the house rule): kept tokens in ascending index order, then the
extra token; ``order="official"``: outliers by descending attention (ties to the lower index), then the grid /
fill tokens ascending, then the extra token, as the official code emits them. Slots that cannot be filled
(``valid=False``) sit between the kept tokens and the extra token.
Positions: renumbered (pre-LLM; the LLM sees a shorter sequence).

Deviations from the official code:
  * Signals. The official hooks the q / k projections of CLIP encoder layer 23 (the last one, which LLaVA
    otherwise does not use) and computes one single-head attention over the full width, ``softmax(q k^T /
    sqrt(1024))`` over CLS + patches. A projector-stage reducer sees the feature layer's signals
    (:class:`~jaxprune.reducers.base.ProjectorContext`; encoder layer 22 for LLaVA-1.5): ``a_j`` = its
    per-head softmax [CLS] attention averaged over heads (as FasterVLM), ``k_j`` = its keys with the heads
    concatenated (the layout of its ``k_proj`` output, bias included).
  * Merge space. The official merges CLIP features before the (non-linear, 2-layer GELU) projector and
    projects the merged tokens; here the projected features are merged: ``proj(x_i) + sum a proj(x_nbr)``
    instead of ``proj(x_i + sum a x_nbr)`` (same for the extra token). Kept indices are unaffected.
  * The static budget above (the official count is adaptive; ``budget`` caps or fills it).
  * Order (``order="raster"`` by default, see above).
  * Ties go to the lower index (outlier ranking and nearest neighbours; ``torch.topk`` has no defined tie
    order); ``lax.top_k`` on similarities.
  * Float32 with ``Precision.HIGHEST`` (the official runs the tower in fp16 and the quartiles in NumPy on an
    fp32 copy); NumPy's linear-interpolation formula is reproduced in float32.
  * Counts are integers: ``int(N * ratio)`` is the outlier count and ``int(1 / ratio)`` is ``N // count``.
    Both are exact in float64 for ``N`` = 576 and 144 (checked for every count); for other ``N`` the official
    float arithmetic can be one lower (``N`` = 100, 29 outliers: 28 kept).
  * The grid ends before ``P - 1`` (the official hard-codes 575 = 576 - 1, so the last patch is never a grid
    pick; the same rule for any ``P``).
  * Inputs where the official code fails: no outlier (division by zero) -> stride ``nv // 3``; more than a
    third of the tokens outliers (``arange`` step 0) -> stride 1; fewer than 33 valid tokens (``topk(k=32)``
    larger than the candidates) -> every other valid token is a neighbour.
  * Masks (the official has none): quartiles, the outlier ratio (``nv`` = valid tokens instead of ``N``), the
    grid, neighbours and the extra token use valid tokens only; invalid tokens are never kept, never merged.
    The extra token is ``valid=False`` when no valid token is left out (the official would emit zeros).
  * Batched: every image gets its own selection (the official is batch size 1: its grid filter flattens the
    indices of the whole batch).
  * ``Reduced.index`` of the extra token is its heaviest contributor (highest attention among the pruned
    valid tokens); ``merged_into`` is not filled (None). The official non-adaptive (training) branch
    (``if_adaptive=False``) is not implemented.
  * LLaVA-NeXT (the official code is LLaVA-1.5 only): runs as any projector-stage reducer -- one selection
    over the packed tokens by default (with ``newlines="prune"`` a newline token, zero attention and keys, is
    never an outlier but can be a grid pick), or per crop with ``next_options(..., per_crop=True)``, where
    :meth:`~jaxprune.reducers.base.ReducerBase.per_segment` gives each crop ``budget // n`` tokens, its own
    extra token included.

On LLaVA-OneVision (SigLIP, no [CLS]) the outlier scores read the CLS-free surrogate in ``ctx.cls_attn``
(attention each patch receives, averaged over its crop's queries; :mod:`jaxprune.families.onevision_spans`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.reducers._core import cosine_similarity, gather, select_topk
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register

_HI = lax.Precision.HIGHEST
_FILLS = ("uniform", "mask")
_ORDERS = ("raster", "official")
NEIGHBOURS = 32  # official ``torch.topk(cos_sim_matrix, k=int(32))``


def iqr_outliers(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """``[N, P]`` scores -> ``[N, P]`` bool: valid tokens above ``Q3 + 1.5 (Q3 - Q1)`` of the valid scores
    (``np.percentile``'s linear interpolation, ``outlier_dectection``)."""
    s = jnp.sort(jnp.where(valid, scores, jnp.inf), axis=1)  # [N, P] valid scores first, ascending
    last = jnp.maximum(valid.sum(axis=1, dtype=jnp.int32) - 1, 0)  # [N]

    def quantile(q: float) -> jax.Array:  # numpy: virtual index q (n - 1), _lerp(lo, hi, frac)
        vi = q * last.astype(jnp.float32)  # [N] exact (a multiple of 1/4)
        lo = jnp.floor(vi).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, last)
        t = vi - lo.astype(jnp.float32)
        a = jnp.take_along_axis(s, lo[:, None], axis=1)[:, 0]
        b = jnp.take_along_axis(s, hi[:, None], axis=1)[:, 0]
        d = b - a
        return jnp.where(t >= 0.5, b - d * (1 - t), a + d * t)  # [N]

    q1, q3 = quantile(0.25), quantile(0.75)
    upper = q3 + 1.5 * (q3 - q1)  # [N]
    return valid & (scores > upper[:, None])


def _mark(n: int, p: int, idx: jax.Array, ok: jax.Array) -> jax.Array:
    """``[N, P]`` bool, True at ``idx [N, k]`` where ``ok`` (other picks leave the mask alone)."""
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    return jnp.zeros((n, p), bool).at[rows, idx].max(ok)


def _ranked(mask: jax.Array, ranks: jax.Array) -> jax.Array:
    """Index of the ``ranks``-th True entry (ascending index order) of each row of ``mask [N, P]``."""
    order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)  # [N, P] True entries first
    return jnp.take_along_axis(order, jnp.clip(ranks, 0, mask.shape[1] - 1), axis=1)


@dataclasses.dataclass(frozen=True)
class PruMergePlus(ReducerBase):
    """``budget - 1`` kept tokens (IQR outliers + spatial grid, merged with their key neighbours) + 1 extra."""

    budget: int
    neighbours: int = NEIGHBOURS
    fill: Literal["uniform", "mask"] = "uniform"
    order: Literal["raster", "official"] = "raster"
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("PruMergePlus.budget", self.budget)
        if self.budget < 2:
            raise BudgetError(f"PruMergePlus.budget={self.budget} must be >= 2 (one kept token + the extra "
                              "merged token)")
        check_budget("PruMergePlus.neighbours", self.neighbours)
        if self.fill not in _FILLS:
            raise ValueError(f"PruMergePlus.fill={self.fill!r} unknown; expected one of {_FILLS}")
        if self.order not in _ORDERS:
            raise ValueError(f"PruMergePlus.order={self.order!r} unknown; expected one of {_ORDERS}")

    def select(self, ctx: ProjectorContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The kept tokens: ``(idx [N, K], ok [N, K], selected [N, P])``, ``K = budget - 1``, in output order."""
        n, p = ctx.valid.shape
        K = self.budget - 1
        valid = ctx.valid  # [N, P]
        a = ctx.cls_attn.astype(jnp.float32).mean(axis=1)  # [N, P]
        out = iqr_outliers(a, valid)  # [N, P]
        j = jnp.arange(p, dtype=jnp.int32)[None, :]  # [1, P]
        i = jnp.arange(K, dtype=jnp.int32)[None, :]  # [1, K] slot numbers
        n_out = out.sum(axis=1, keepdims=True, dtype=jnp.int32)  # [N, 1] official int(N * ratio)
        nv = valid.sum(axis=1, keepdims=True, dtype=jnp.int32)  # [N, 1]

        # 1. outliers: the min(n_out, K) highest
        o_idx, o_ok = select_topk(a, K, out)  # [N, K]
        sel = _mark(n, p, o_idx, o_ok)  # [N, P]
        m = K - jnp.minimum(n_out, K)  # [N, 1] slots left for the grid (and fill)

        # 2. the official grid: arange(0, P - 1, int(int(1 / ratio) / 3)) minus the outliers
        stride = jnp.maximum((nv // jnp.maximum(n_out, 1)) // 3, 1)  # [N, 1]
        grid = valid & ~out & (j % stride == 0) & (j < p - 1)  # [N, P]
        g = grid.sum(axis=1, keepdims=True, dtype=jnp.int32)  # [N, 1]
        ranks = jnp.where(g > m, (i * g) // jnp.maximum(m, 1), i)  # [N, K] m evenly spaced, or all g
        sel = sel | _mark(n, p, _ranked(grid, ranks), i < jnp.minimum(g, m))

        # 3. fill: m - g more, evenly spaced over the remaining valid tokens
        if self.fill == "uniform":
            rest = valid & ~out & ~grid  # [N, P]
            r = rest.sum(axis=1, keepdims=True, dtype=jnp.int32)  # [N, 1]
            f = jnp.maximum(m - g, 0)  # [N, 1]
            ranks = jnp.where(r > f, (i * r) // jnp.maximum(f, 1), i)  # [N, K]
            sel = sel | _mark(n, p, _ranked(rest, ranks), i < jnp.minimum(f, r))

        count = sel.sum(axis=1, keepdims=True, dtype=jnp.int32)  # [N, 1] <= K
        jj = jnp.broadcast_to(j, (n, p))
        if self.order == "raster":
            idx = jnp.argsort(~sel, axis=1, stable=True)[:, :K]
        else:  # outliers by descending attention, then the other kept tokens ascending, then the rest
            group = jnp.where(sel & out, 0, jnp.where(sel, 1, 2))
            idx = jnp.lexsort((jj, jnp.where(sel & out, -a, 0.0), group), axis=-1)[:, :K]
        return idx.astype(jnp.int32), i < count, sel

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        n, p = ctx.valid.shape
        self.output_tokens(p)
        K = self.budget - 1
        valid = ctx.valid
        a = ctx.cls_attn.astype(jnp.float32).mean(axis=1)  # [N, P]
        x = jnp.where(valid[..., None], ctx.features.astype(jnp.float32), 0.0)  # [N, P, H]; invalid: nothing
        idx, ok, sel = self.select(ctx)  # [N, K], [N, K], [N, P]

        # merge: each kept token + sum of a_nbr x_nbr over its nearest neighbours by key cosine (itself excluded)
        keys = ctx.keys.reshape(n, p, -1)  # [N, P, heads * hd] = the layer's k_proj output
        sim = cosine_similarity(gather(keys, idx), keys, eps=1e-12)  # [N, K, P] (F.normalize's eps)
        j = jnp.arange(p, dtype=jnp.int32)
        cand = valid[:, None, :] & (j[None, None, :] != idx[:, :, None])  # [N, K, P]
        sim = jnp.where(cand, sim, -jnp.inf)
        kn = min(self.neighbours, p - 1)
        merged = gather(x, idx)  # [N, K, H]
        if kn > 0:
            vals, nbr = lax.top_k(sim, kn)  # [N, K, kn], ties to the lower index
            w = jnp.where(jnp.isfinite(vals), jnp.take_along_axis(a[:, None, :], nbr, axis=2), 0.0)
            rows = jnp.arange(n, dtype=jnp.int32)[:, None, None]
            slots = jnp.arange(K, dtype=jnp.int32)[None, :, None]
            weights = jnp.zeros((n, K, p), jnp.float32).at[rows, slots, nbr].add(w)  # [N, K, P]
            merged = merged + jnp.einsum("nkp,nph->nkh", weights, x, precision=_HI)

        # the extra token: sum of a_j x_j over the valid tokens left out
        rest = valid & ~sel  # [N, P]
        extra = jnp.einsum("np,nph->nh", jnp.where(rest, a, 0.0), x, precision=_HI)  # [N, H]
        e_idx = jnp.argmax(jnp.where(rest, a, -jnp.inf), axis=1).astype(jnp.int32)  # [N] heaviest contributor
        tokens = jnp.concatenate([merged, extra[:, None]], axis=1).astype(ctx.features.dtype)  # [N, budget, H]
        index = jnp.concatenate([idx, e_idx[:, None]], axis=1)  # [N, budget]
        valid_out = jnp.concatenate([ok, rest.any(axis=1, keepdims=True)], axis=1)  # [N, budget]
        return Reduced(tokens=tokens, index=index, valid=valid_out)


def prumerge_plus(budget: int, neighbours: int = NEIGHBOURS, fill: Literal["uniform", "mask"] = "uniform",
                  order: Literal["raster", "official"] = "raster") -> PruMergePlus:
    """LLaVA-PruMerge+ at ``budget`` visual tokens per image (``budget - 1`` kept + 1 extra merged token)."""
    return PruMergePlus(budget=budget, neighbours=neighbours, fill=fill, order=order)


register("prumerge_plus", lambda b, c: prumerge_plus(b))

__all__ = ["PruMergePlus", "prumerge_plus"]
