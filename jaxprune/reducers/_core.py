"""Static-shape primitives shared by every reducer: select, gather, complement, assign, merge.

Every function here is pure and jittable. Output shapes depend only on input shapes and on
static Python arguments (budgets ``k``, ``window``, ``grid``), which are validated eagerly with
a ``ValueError`` naming the argument. Variable numbers of valid tokens are carried by boolean
masks, never by shapes; there is no Python control flow on traced values and no host callback.

Conventions
  * ``B`` batch, ``N`` tokens, ``D`` features, ``k``/``K`` kept or target tokens, ``M`` dropped.
  * Determinism: ties are always broken towards the lower index.
  * Masked slots point at an in-range index (never garbage) and come with a ``False`` mask.
  * Similarities and merges are computed in float32 (``Precision.HIGHEST``, so no TF32 on GPU)
    and merged features are cast back to the dtype of ``kept``.
"""

from __future__ import annotations

import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = [
    "select_topk",
    "gather",
    "gather_mask",
    "complement_indices",
    "cosine_similarity",
    "assign_argmax",
    "merge_into",
    "pool_2d",
    "uniform_indices",
    "strided_grid_indices",
    "masked_softmax",
]

MergeMode = Literal["mean", "weighted", "size", "target_plus_mean"]
_MERGE_MODES = ("mean", "weighted", "size", "target_plus_mean")
_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- validation
def _static_int(name: str, value: object, lo: int, hi: int | None = None, what: str = "") -> int:
    """Return ``value`` as a Python int in ``[lo, hi]`` or raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name} must be a static Python int, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v} out of range: need {name} in {bound}{what}")
    return v


def _check_rank(name: str, x: jax.Array, ndim: int, at_least: bool = False) -> None:
    ok = x.ndim >= ndim if at_least else x.ndim == ndim
    if not ok:
        raise ValueError(f"{name} must have {'>= ' if at_least else ''}{ndim} dims, got shape {x.shape}")


def _rows(b: int) -> jax.Array:
    return jnp.arange(b, dtype=jnp.int32)[:, None]  # [B, 1]


def _compact(sel: jax.Array, size: int) -> jax.Array:
    """Indices of the True entries of ``sel`` [B, N] in ascending order, as [B, size] int32.

    Rows with more than ``size`` True entries keep the first ``size``; rows with fewer leave the
    tail slots at 0 (callers guarantee exactly ``size`` in practice).
    """
    b, n = sel.shape
    pos = jnp.cumsum(sel, axis=-1, dtype=jnp.int32) - 1  # [B, N]
    pos = jnp.where(sel, pos, size)  # unselected -> out of range, dropped by the scatter
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    out = jnp.zeros((b, size), jnp.int32)
    return out.at[_rows(b), pos].set(iota, mode="drop")  # [B, size]


# ----------------------------------------------------------------------------- selection
def select_topk(
    scores: ArrayLike, k: int, valid: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """Indices of the ``k`` highest scores per row, in ascending index order.

    Args:
      scores: ``[B, N]`` real scores. NaN is treated as ``-inf``. Integer scores are cast to
        float32 (exact up to 2**24).
      k: static budget, ``1 <= k <= N``.
      valid: optional ``[B, N]`` bool; invalid tokens are never chosen while a valid token
        (even one scoring ``-inf``/NaN) remains unchosen.

    Returns:
      ``idx`` ``[B, k]`` int32 and ``idx_valid`` ``[B, k]`` bool. The selected set is exact and
      deterministic: highest score first, ties broken by lower index (done here explicitly, so
      it does not depend on the tie policy of ``lax.top_k``). The valid picks fill the first
      ``min(k, n_valid)`` slots in ascending index order; ``idx_valid`` is therefore a prefix
      mask and the whole row is ascending whenever it is fully valid. If a row has fewer than
      ``k`` valid tokens the remaining slots point at the lowest-index *invalid* tokens (all
      indices in a row are distinct and in range) with ``idx_valid`` False.
    """
    scores = jnp.asarray(scores)
    _check_rank("scores", scores, 2)
    b, n = scores.shape
    k = _static_int("k", k, 1, n, f" (N={n} tokens)")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    valid = jnp.ones((b, n), bool) if valid is None else jnp.asarray(valid, bool)  # [B, N]
    if valid.shape != (b, n):
        raise ValueError(f"valid shape {valid.shape} != scores shape {(b, n)}")
    neg_inf = jnp.asarray(-jnp.inf, scores.dtype)
    s = jnp.where(jnp.isnan(scores) | ~valid, neg_inf, scores)  # [B, N]
    vals, _ = lax.top_k(s, k)  # [B, k]; only the k-th value (the threshold) is used
    t = vals[:, k - 1 : k]  # [B, 1]
    above = s > t  # [B, N]; subset of valid (invalid are -inf <= t)
    eq = s == t  # [B, N]
    need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)  # [B, 1], >= 1
    eq_v = eq & valid
    take_v = eq_v & (jnp.cumsum(eq_v, axis=-1, dtype=jnp.int32) <= need)  # lowest index first
    sel_v = above | take_v  # [B, N] chosen valid tokens
    n_v = jnp.sum(sel_v, axis=-1, keepdims=True, dtype=jnp.int32)  # [B, 1] = min(k, n_valid)
    eq_i = eq & ~valid  # only non-empty when t == -inf
    sel_i = eq_i & (jnp.cumsum(eq_i, axis=-1, dtype=jnp.int32) <= k - n_v)  # [B, N] fillers
    pos_v = jnp.cumsum(sel_v, axis=-1, dtype=jnp.int32) - 1
    pos_i = n_v + jnp.cumsum(sel_i, axis=-1, dtype=jnp.int32) - 1
    pos = jnp.where(sel_v, pos_v, jnp.where(sel_i, pos_i, k))  # [B, N]; k = not selected
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    idx = jnp.zeros((b, k), jnp.int32).at[_rows(b), pos].set(iota, mode="drop")  # [B, k]
    idx_valid = jnp.arange(k, dtype=jnp.int32)[None, :] < n_v  # [B, k]
    return idx, idx_valid


def gather(x: ArrayLike, idx: ArrayLike) -> jax.Array:
    """Gather tokens along axis 1: ``x`` ``[B, N, ...]``, ``idx`` ``[B, k]`` -> ``[B, k, ...]``.

    ``idx`` must be in range (every index produced by this module is); out-of-range indices
    follow ``jnp.take_along_axis``'s default (fill) mode.
    """
    x, idx = jnp.asarray(x), jnp.asarray(idx)
    _check_rank("x", x, 2, at_least=True)
    _check_rank("idx", idx, 2)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"batch mismatch: x {x.shape} vs idx {idx.shape}")
    ix = idx.reshape(idx.shape + (1,) * (x.ndim - 2))  # [B, k, 1, ...]
    return jnp.take_along_axis(x, ix, axis=1)  # [B, k, ...]


def gather_mask(
    mask: ArrayLike | None, idx: ArrayLike, idx_valid: ArrayLike | None = None
) -> jax.Array:
    """Gather a token mask: ``mask`` ``[B, N]`` bool (None = all valid), ``idx`` ``[B, k]`` -> ``[B, k]``.

    The result is additionally AND-ed with ``idx_valid`` ``[B, k]`` when given.
    """
    idx = jnp.asarray(idx)
    _check_rank("idx", idx, 2)
    out = jnp.ones(idx.shape, bool) if mask is None else gather(jnp.asarray(mask, bool), idx)
    if idx_valid is not None:
        out = out & jnp.asarray(idx_valid, bool)
    return out  # [B, k]


def complement_indices(
    idx: ArrayLike, n: int, valid: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """The ``n - k`` indices in ``[0, n)`` not in ``idx`` ``[B, k]``, ascending.

    ``idx`` is expected to hold distinct indices (as ``select_topk`` returns). With duplicates
    more than ``n - k`` indices are free; the lowest ``n - k`` are returned.

    Returns ``rest`` ``[B, n-k]`` int32 and ``rest_valid`` ``[B, n-k]`` bool (``valid`` gathered
    at ``rest``; all True when ``valid`` is None).
    """
    idx = jnp.asarray(idx)
    _check_rank("idx", idx, 2)
    b, k = idx.shape
    n = _static_int("n", n, k, None, f" (idx has k={k} columns)")
    kept = jnp.zeros((b, n), bool).at[_rows(b), idx].set(True, mode="drop")  # [B, n]
    rest = _compact(~kept, n - k)  # [B, n-k]
    rest_valid = gather_mask(valid, rest)  # [B, n-k]
    return rest, rest_valid


# ----------------------------------------------------------------------------- similarity
def cosine_similarity(a: ArrayLike, b: ArrayLike, eps: float = 1e-6) -> jax.Array:
    """Cosine similarity ``a`` ``[B, M, D]`` x ``b`` ``[B, K, D]`` -> ``[B, M, K]`` float32.

    Vectors are divided by ``max(||v||, eps)``, so all-zero vectors give similarity 0 (no NaN).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    _check_rank("a", a, 3)
    _check_rank("b", b, 3)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"shape mismatch: a {a.shape} vs b {b.shape}")

    def unit(v: jax.Array) -> jax.Array:
        sq = jnp.sum(v * v, axis=-1, keepdims=True)  # [B, *, 1]
        return v * lax.rsqrt(jnp.maximum(sq, eps * eps))

    return jnp.einsum("bmd,bkd->bmk", unit(a), unit(b), precision=_HI)  # [B, M, K]


def assign_argmax(sim: ArrayLike, target_valid: ArrayLike | None = None) -> jax.Array:
    """Hard assignment of each row item to its most similar valid target.

    ``sim`` ``[B, M, K]``, ``target_valid`` ``[B, K]`` bool -> ``[B, M]`` int32. Ties go to the
    lower target index; NaN counts as ``-inf``. A valid target always beats an invalid one (even
    at ``-inf`` similarity); a row with no valid target gets 0 (mask it via ``dropped_valid``).
    """
    sim = jnp.asarray(sim)
    _check_rank("sim", sim, 3)
    bsz, _, kt = sim.shape
    tv = jnp.ones((bsz, kt), bool) if target_valid is None else jnp.asarray(target_valid, bool)
    if tv.shape != (bsz, kt):
        raise ValueError(f"target_valid shape {tv.shape} != {(bsz, kt)}")
    s = jnp.where(jnp.isnan(sim) | ~tv[:, None, :], -jnp.inf, sim)  # [B, M, K]
    best = jnp.argmax(s, axis=-1).astype(jnp.int32)  # [B, M]; first max
    first_valid = jnp.argmax(tv, axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
    all_neg_inf = jnp.max(s, axis=-1) == -jnp.inf  # [B, M]
    return jnp.where(all_neg_inf, first_valid, best)


# ----------------------------------------------------------------------------- merging
def merge_into(
    kept: ArrayLike,
    dropped: ArrayLike,
    assignment: ArrayLike,
    weights: ArrayLike | None = None,
    dropped_valid: ArrayLike | None = None,
    kept_weight: ArrayLike | None = None,
    mode: MergeMode = "mean",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Merge dropped tokens ``[B, M, D]`` into kept tokens ``[B, K, D]`` by ``assignment`` ``[B, M]``.

    Let ``S_j`` be the set of valid dropped tokens with ``assignment == j`` (invalid ones and
    out-of-range assignments contribute nothing, their values are ignored even if NaN),
    ``w`` = ``weights`` ``[B, M]`` (default 1) and ``c`` = ``kept_weight`` ``[B, K]`` (default 1).

    * ``"mean"``: ``(kept_j + sum_{S_j} d) / (1 + |S_j|)``. Takes no weights.
    * ``"weighted"``: ``(c_j kept_j + sum_{S_j} w d) / (c_j + sum_{S_j} w)``; where that total
      weight is 0 the kept token is returned unchanged.
    * ``"size"``: ToMe's size-weighted average (facebookresearch/ToMe ``merge_wavg``): same
      formula with ``c`` = current sizes and ``w`` = dropped sizes; returns
      ``(merged, new_sizes)`` with ``new_sizes = c + sum_{S_j} w`` ``[B, K]``.
    * ``"target_plus_mean"``: VisionZip contextual tokens (dvlab-research/VisionZip
      ``visionzip/clip_encoder.py``: ``target_hidden + (one_hot^T @ hidden) / counts.clamp(1)``):
      ``kept_j + sum_{S_j} w d / sum_{S_j} w`` where ``S_j`` is non-empty, else ``kept_j``.
      With default weights this is exactly the official rule. Takes no ``kept_weight``.

    The sums are one-hot matmuls with static sizes in float32 (HIGHEST precision, deterministic);
    the merged tokens are cast back to ``kept.dtype``.
    """
    if mode not in _MERGE_MODES:
        raise ValueError(f"mode={mode!r} unknown; expected one of {_MERGE_MODES}")
    if mode == "mean" and (weights is not None or kept_weight is not None):
        raise ValueError("mode='mean' takes no weights/kept_weight; use mode='weighted'")
    if mode == "target_plus_mean" and kept_weight is not None:
        raise ValueError("mode='target_plus_mean' takes no kept_weight")
    kept, dropped = jnp.asarray(kept), jnp.asarray(dropped)
    assignment = jnp.asarray(assignment)
    _check_rank("kept", kept, 3)
    _check_rank("dropped", dropped, 3)
    _check_rank("assignment", assignment, 2)
    b, kt, d = kept.shape
    m = dropped.shape[1]
    if dropped.shape != (b, m, d) or assignment.shape != (b, m):
        raise ValueError(f"shape mismatch: kept {kept.shape}, dropped {dropped.shape}, "
                         f"assignment {assignment.shape}")
    f32 = jnp.promote_types(kept.dtype, jnp.float32)
    dv = jnp.ones((b, m), bool) if dropped_valid is None else jnp.asarray(dropped_valid, bool)
    w = jnp.ones((b, m), f32) if weights is None else jnp.asarray(weights, f32)  # [B, M]
    w = jnp.where(dv, w, 0.0)
    dx = jnp.where(dv[..., None], dropped.astype(f32), 0.0)  # [B, M, D]
    onehot = (assignment[..., None] == jnp.arange(kt)[None, None, :]).astype(f32)  # [B, M, K]
    wsum = jnp.einsum("bmk,bm->bk", onehot, w, precision=_HI)  # [B, K]
    xsum = jnp.einsum("bmk,bmd->bkd", onehot, dx * w[..., None], precision=_HI)  # [B, K, D]
    kx = kept.astype(f32)
    if mode == "target_plus_mean":
        mean = xsum / jnp.where(wsum > 0, wsum, 1.0)[..., None]
        return (kx + jnp.where((wsum > 0)[..., None], mean, 0.0)).astype(kept.dtype)
    c = jnp.ones((b, kt), f32) if kept_weight is None else jnp.asarray(kept_weight, f32)
    total = c + wsum  # [B, K]
    merged = (c[..., None] * kx + xsum) / jnp.where(total != 0, total, 1.0)[..., None]
    merged = jnp.where((total != 0)[..., None], merged, kx).astype(kept.dtype)  # [B, K, D]
    return (merged, total) if mode == "size" else merged


# ----------------------------------------------------------------------------- static patterns
def pool_2d(x: ArrayLike, grid: tuple[int, int], window: int) -> jax.Array:
    """Average-pool raster tokens ``[B, H*W, D]`` on their ``(H, W)`` grid with a square window.

    Returns ``[B, (H/window)*(W/window), D]`` in raster order. ``H`` and ``W`` must be divisible
    by ``window`` (``ValueError`` otherwise); ``window=1`` is the identity.
    """
    x = jnp.asarray(x)
    _check_rank("x", x, 3)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise ValueError(f"grid must be a (H, W) tuple, got {grid!r}")
    h = _static_int("grid[0]", grid[0], 1)
    w = _static_int("grid[1]", grid[1], 1)
    win = _static_int("window", window, 1)
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"grid={grid} needs N={h * w} tokens, x has N={n}")
    if h % win or w % win:
        raise ValueError(f"window={win} must divide grid {grid}")
    y = x.reshape(b, h // win, win, w // win, win, d)  # [B, H/w, w, W/w, w, D]
    return y.mean(axis=(2, 4)).reshape(b, (h // win) * (w // win), d)


def uniform_indices(
    n: int, k: int, rule: Literal["floor", "center", "step"] = "floor"
) -> np.ndarray:
    """``k`` evenly spaced, strictly increasing indices in ``[0, n)`` (a static NumPy int32 array).

    Rules, for ``i = 0..k-1``:
      * ``"floor"`` (default): ``floor(i * n / k)``; starts at 0.
      * ``"center"``: ``floor((2i + 1) * n / (2k))``; the centre of each of k equal bins.
      * ``"step"``: ``i * max(1, n // k)``; VisionZip's contextual targets
        (``arange(0, n, step)[:k]``), which bunch towards the front when ``k`` does not divide n.
    """
    n = _static_int("n", n, 1)
    k = _static_int("k", k, 1, n, f" (n={n})")
    i = np.arange(k, dtype=np.int64)
    if rule == "floor":
        out = (i * n) // k
    elif rule == "center":
        out = ((2 * i + 1) * n) // (2 * k)
    elif rule == "step":
        out = i * max(1, n // k)
    else:
        raise ValueError(f"rule={rule!r} unknown; expected 'floor', 'center' or 'step'")
    return out.astype(np.int32)


def strided_grid_indices(h: int, w: int, stride_h: int, stride_w: int) -> np.ndarray:
    """Raster indices ``r * w + c`` for ``r in range(0, h, stride_h)``, ``c in range(0, w, stride_w)``.

    A static NumPy int32 array of length ``ceil(h/stride_h) * ceil(w/stride_w)``, ascending
    (row-major), starting at the top-left token (offset 0).
    """
    h = _static_int("h", h, 1)
    w = _static_int("w", w, 1)
    sh = _static_int("stride_h", stride_h, 1)
    sw = _static_int("stride_w", stride_w, 1)
    r = np.arange(0, h, sh, dtype=np.int64)
    c = np.arange(0, w, sw, dtype=np.int64)
    return (r[:, None] * w + c[None, :]).reshape(-1).astype(np.int32)


def masked_softmax(logits: ArrayLike, mask: ArrayLike | None, axis: int = -1) -> jax.Array:
    """Softmax over ``axis`` restricted to ``mask`` (broadcastable bool; None = all True).

    Computed in float32 (at least) and returned in ``logits.dtype``. Masked entries are 0;
    rows with no unmasked entry (or only ``-inf`` logits) are all zeros, never NaN.
    """
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    out_dtype = logits.dtype
    x = logits.astype(jnp.promote_types(out_dtype, jnp.float32))
    mask = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    x = jnp.where(mask, x, -jnp.inf)
    mx = jnp.max(x, axis=axis, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.where(mask, jnp.exp(x - mx), 0.0)
    den = jnp.sum(e, axis=axis, keepdims=True)
    return (e / jnp.where(den > 0, den, 1.0)).astype(out_dtype)
