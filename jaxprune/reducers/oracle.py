"""Oracle: keep the patches of the object the question asks about, then spread the rest evenly (synthvqa only).

Not a method from a paper: the upper bound of the synthetic-VQA benchmark (issue #16, DESIGN.md rung 5). It reads
information no real reducer has, the per-patch ``patch_prior`` the synthvqa benchmark computes from its scene
generator (:func:`jaxprune.eval.synthvqa.targets.patch_prior`: > 0 on the patches of the asked object -- every
object of the colour for "how many", none for an "is there" whose answer is no -- higher towards each object's
centre, 0 elsewhere), passed as
``model(..., reducer=oracle(k), reducer_inputs={"patch_prior": [images, P]})``. Without it the engine refuses the
call by name (:mod:`jaxprune.engine.reducer_inputs`); the registry lists the name for the synthvqa benchmark only.

Rule (deterministic, one ranking per image):

1. the valid patches with ``prior > 0`` first, higher prior first, ties by lower index (more of them than the budget:
   the first ``budget`` of that order);
2. the ``r = budget - n_target`` remaining slots take evenly spaced patches among the other valid ones in raster
   order (``floor`` rule of :func:`jaxprune.reducers.controls.uniform`: rank ``floor(i m / r)`` of the ``m``
   non-target patches, ``i = 0..r-1``), so the background the model sees keeps its spatial spread and roughly its
   share of the image, as random pruning keeps it;
3. kept indices in raster order (order-preserving, as every pre-LLM reducer here); too few valid patches: the
   remaining slots come back ``valid=False``.

Stage: ``projector`` (the prior is per tower patch; composed after another pre-LLM reducer, each surviving slot
reads its source patch's prior). Positions: renumbered (pre-LLM).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxprune.inputs import InputError
from jaxprune.reducers._core import select_topk
from jaxprune.reducers.base import ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register

PRIOR = "patch_prior"
#: the only benchmark that supplies :data:`PRIOR`
BENCHMARK = "synthvqa"


@dataclasses.dataclass(frozen=True)
class Oracle(ReducerBase):
    """Keep the ``budget`` patches the caller's ``patch_prior`` ranks first, the rest evenly spaced."""

    budget: int
    stage: ClassVar[str] = "projector"
    inputs: ClassVar[tuple[str, ...]] = (PRIOR,)

    def __post_init__(self):
        check_budget("Oracle.budget", self.budget)

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        if not ctx.inputs or PRIOR not in ctx.inputs:
            raise InputError(f"Oracle needs reducer_inputs[{PRIOR!r}] (the asked object's patches), which only the "
                             f"{BENCHMARK} benchmark supplies (jaxprune.eval.synthvqa.targets.patch_prior)")
        k = check_budget("Oracle.budget", self.budget, ctx.num_tokens)
        idx, ok = oracle_indices(ctx.inputs[PRIOR], ctx.valid, k)  # [N, k]
        return Reduced.gather(ctx.features, idx, ok)  # [N, k, H]


def oracle_indices(prior: jax.Array, valid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``prior [N, P]``, ``valid [N, P]`` bool, static ``k`` -> ``(idx [N, k] ascending, ok [N, k])``: the rule of
    the module docstring."""
    n, p = valid.shape
    prior = prior.astype(jnp.float32)
    target = valid & (prior > 0)  # [N, P]
    rest = valid & ~target  # [N, P]
    n_t = jnp.sum(target, axis=1, dtype=jnp.int32)  # [N]
    m = jnp.sum(rest, axis=1, dtype=jnp.int32)  # [N]
    r = jnp.clip(k - n_t, 0, m)  # [N] slots left for the rest
    order = jnp.argsort(~rest, axis=1, stable=True).astype(jnp.int32)  # [N, P] rest first, ascending
    i = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, k]
    rank = jnp.clip((i * m[:, None]) // jnp.maximum(r, 1)[:, None], 0, p - 1)  # [N, k]
    pick = jnp.take_along_axis(order, rank, axis=1)  # [N, k]
    pick = jnp.where(i < r[:, None], pick, p)  # [N, k]; p = dropped by the scatter
    rows = jnp.arange(n)[:, None]
    fill = jnp.zeros((n, p), jnp.float32).at[rows, pick].set(1.0, mode="drop")  # [N, P]
    score = jnp.where(target, 2.0 + prior / (1.0 + prior), fill)  # targets in (2, 3), picked rest 1, others 0
    return select_topk(score, k, valid)


def oracle(budget: int) -> Oracle:
    """The synthvqa upper bound at ``budget`` visual tokens (needs ``reducer_inputs={"patch_prior": ...}``)."""
    return Oracle(budget=budget)


register("oracle", lambda b, c: oracle(b), model_types=("llava",), benchmarks=(BENCHMARK,))

__all__ = ["Oracle", "oracle"]
