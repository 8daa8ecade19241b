"""Control reducers: random pruning, evenly spaced (uniform) pruning, and 2-D average pooling.

These are the baselines every visual-token-reduction paper compares against; none has an
"official" repository, so each rule is specified here and tested against plain NumPy.

* :func:`random_prune` -- keep ``budget`` tokens chosen uniformly at random (without replacement)
  among the valid ones, in raster order. As FasterVLM's commented-out random baseline
  (Theia-4869/FasterVLM ``llava/model/llava_arch.py``, ``encode_images``: ``torch.rand`` scores
  -> ``topk`` -> ``sort``): scores ``u_j ~ U[0, 1)`` from ``jax.random.uniform``, top ``budget``
  valid tokens by score (ties to the lower index), kept indices sorted.
  Determinism: the key is ``fold_in(key(seed), n)`` where ``n`` is the image's row in the batch
  of images the reducer receives, so rows differ and a given (seed, row) always gives the same
  picks. A fresh key per call cannot be drawn inside ``jit`` (the spec is static and the reducer
  is pure), so *the same image at the same row gets the same picks on every call*; to vary the
  draw, change ``seed``. Consequence: a row's picks depend on its position in the batch (so
  "batched == row by row" holds only when each row keeps its index; see the tests).
* :func:`uniform` -- ``budget`` evenly spaced tokens in raster order, among the valid ones:
  with ``n`` valid tokens, slot ``i`` takes the valid token of rank ``r_i`` (``rule="floor"``:
  ``r_i = floor(i n / k)``; ``"center"``: ``floor((2i+1) n / (2k))``; ``"step"``:
  ``i * max(1, n // k)``, the rules of ``_core.uniform_indices``). With every token valid this is
  exactly ``uniform_indices(P, k, rule)``. If ``n < k`` every valid token is kept and the other
  slots come back ``valid=False``.
* :func:`pool` / :func:`pool2x2` -- average pooling of the projected tokens on the patch grid with
  a square ``window`` (non-overlapping, stride = window; ``_core.pool_2d``), raster order; the
  output has ``P / window**2`` tokens (144 for 576 with a 2x2 window). Invalid tokens do not
  contribute: each pooled token is the mean of the *valid* tokens of its window, and a window
  with none comes back ``valid=False`` (zeros). ``Reduced.index`` of a pooled token is the first
  valid token of its window in raster order (its top-left token when all are valid); signals
  that later stages gather by index (CLS attention, keys, vision features) therefore come from
  that representative token, not a pooled value. ``merged_into`` is not filled.

Positions: renumbered (pre-LLM; the LLM sees a shorter sequence). All three run at the
``projector`` stage, on the projected tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from jaxprune.reducers._core import pool_2d, select_topk
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register

_RULES = ("floor", "center", "step")


@dataclasses.dataclass(frozen=True)
class RandomPrune(ReducerBase):
    """Keep ``budget`` random valid tokens (deterministic per ``seed`` and per image row)."""

    budget: int
    seed: int = 0
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("RandomPrune.budget", self.budget)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"RandomPrune.seed must be a Python int, got {self.seed!r}")

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        n, p = ctx.valid.shape
        base = jax.random.key(self.seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n, dtype=jnp.uint32))  # [N]
        scores = jax.vmap(lambda k: jax.random.uniform(k, (p,), jnp.float32))(keys)  # [N, P]
        idx, ok = select_topk(scores, self.budget, ctx.valid)  # [N, k] sorted, valid first
        return Reduced.gather(ctx.features, idx, ok)  # [N, k, H]


@dataclasses.dataclass(frozen=True)
class Uniform(ReducerBase):
    """Keep ``budget`` evenly spaced valid tokens (raster order)."""

    budget: int
    rule: Literal["floor", "center", "step"] = "floor"
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("Uniform.budget", self.budget)
        if self.rule not in _RULES:
            raise ValueError(f"Uniform.rule={self.rule!r} unknown; expected one of {_RULES}")

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        k = self.budget
        n_tok = ctx.num_tokens
        check_budget("Uniform.budget", k, n_tok)
        valid = ctx.valid  # [N, P]
        order = jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)  # [N, P] valid first, ascending
        nv = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None]  # [N, 1]
        i = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, k]
        if self.rule == "floor":
            r = (i * nv) // k
        elif self.rule == "center":
            r = ((2 * i + 1) * nv) // (2 * k)
        else:
            r = i * jnp.maximum(1, nv // k)
        r = jnp.where(nv >= k, r, i)  # [N, k]; too few valid: all of them, then invalid fillers
        idx = jnp.take_along_axis(order, r, axis=1)  # [N, k]
        ok = i < jnp.minimum(nv, k)  # [N, k]
        return Reduced.gather(ctx.features, idx, ok)  # [N, k, H]


@dataclasses.dataclass(frozen=True)
class Pool(ReducerBase):
    """Average-pool the projected tokens in ``window x window`` blocks of the patch grid.

    ``budget`` is optional: the output size is fixed at ``P / window**2``; when given it must
    equal that number (checked against the tokens present by :meth:`output_tokens`).
    """

    window: int = 2
    budget: int | None = None
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("Pool.window", self.window)
        if self.budget is not None:
            check_budget("Pool.budget", self.budget)

    def output_tokens(self, available: int) -> int:
        g = math.isqrt(available)
        if g * g != available:
            raise BudgetError(f"Pool needs a square patch grid, got {available} tokens")
        if g % self.window:
            raise BudgetError(f"Pool.window={self.window} does not divide the {g}x{g} patch grid")
        out = (g // self.window) ** 2
        if self.budget is not None and self.budget != out:
            raise BudgetError(f"Pool.budget={self.budget} does not match the {out} tokens a {self.window}x"
                              f"{self.window} pool of {available} tokens gives")
        return out

    def per_segment(self, n: int) -> "Pool":
        """Itself: a pool has a fixed output per segment (``P / window**2`` of each), no budget to split."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"per_segment: n must be a positive Python int, got {n!r}")
        return self

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        h, w = ctx.grid
        win = self.window
        if h * w != ctx.num_tokens or h % win or w % win:
            raise BudgetError(f"Pool.window={win} needs a grid divisible by it; grid {ctx.grid}, "
                              f"{ctx.num_tokens} tokens")
        p = ctx.num_tokens
        v = ctx.valid.astype(jnp.float32)  # [N, P]
        x = ctx.features.astype(jnp.float32) * v[..., None]  # [N, P, H]
        xs = pool_2d(x, (h, w), win)  # [N, k, H] mean of x*v per window
        vs = pool_2d(v[..., None], (h, w), win)[..., 0]  # [N, k] fraction of valid tokens per window
        ok = vs > 0  # [N, k]
        tokens = jnp.where(ok[..., None], xs / jnp.where(ok, vs, 1.0)[..., None], 0.0)  # [N, k, H]
        # representative source index: first valid token of each window (raster order inside it)
        ids = jnp.arange(p, dtype=jnp.int32).reshape(h // win, win, w // win, win)
        ids = ids.transpose(0, 2, 1, 3).reshape(-1, win * win)  # [k, win*win]
        vw = ctx.valid[:, ids]  # [N, k, win*win]
        first = jnp.argmax(vw, axis=-1)  # [N, k]; 0 (top-left) when the window has no valid token
        idx = jnp.take_along_axis(jnp.broadcast_to(ids[None], vw.shape), first[..., None], axis=-1)[..., 0]
        return Reduced(tokens.astype(ctx.features.dtype), idx.astype(jnp.int32), ok)


def random_prune(budget: int, seed: int = 0) -> RandomPrune:
    """Keep ``budget`` random visual tokens per image (deterministic per ``seed`` and image row)."""
    return RandomPrune(budget=budget, seed=seed)


def uniform(budget: int, rule: Literal["floor", "center", "step"] = "floor") -> Uniform:
    """Keep ``budget`` evenly spaced visual tokens per image (raster order)."""
    return Uniform(budget=budget, rule=rule)


def pool(window: int, budget: int | None = None) -> Pool:
    """Average-pool the projected tokens in ``window x window`` blocks: ``P / window**2`` tokens."""
    return Pool(window=window, budget=budget)


def pool2x2(budget: int | None = None) -> Pool:
    """2x2 average pooling of the projected tokens: ``P / 4`` tokens (144 for 576)."""
    return Pool(window=2, budget=budget)


register("random", lambda b, c: random_prune(b))
register("uniform", lambda b, c: uniform(b))

__all__ = ["Pool", "RandomPrune", "Uniform", "pool", "pool2x2", "random_prune", "uniform"]
