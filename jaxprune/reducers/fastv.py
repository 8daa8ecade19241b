"""FastV: after layer K, keep the visual tokens the last prompt token attended to most at layer K-1.

Paper: "An Image is Worth 1/2 Tokens After Layer 2" (arXiv 2403.06764, ECCV'24).
Code: pkunlp-icler/FastV @ d1659729, ``src/transformers/src/transformers/models/llama/modeling_llama.py``
(``LlamaModel.forward``, branch ``USE_FAST_V and FASTV_INPLACE``) and ``src/FastV/lmms-eval/fastv_kvcache.py``.
Score: ``s_j = mean_h softmax(q_last K^T / sqrt(d))_h[j]`` at layer K-1 (post-RoPE q/k, softmax over
the whole causal row), sliced to the image tokens; keep the top ``keep`` (``round(V * (1 - R))`` for a
drop ratio R), sorted. Text and system tokens are always kept.
Positions: ``keep`` -- the kept tokens keep their original RoPE positions (``position_ids = keep_indexs``).
Deviations from the official code: the score row is recomputed from layer K-1's q/k
(``attention_rows``) instead of materialising the full attention matrix (same numbers); batches of
any size with padding (the official code is batch 1); "last token" = each row's last valid token;
ties go to the lower index. The KV cache keeps all tokens for layers < K and only the kept ones for
layers >= K (the kv-cache variant in the repo duplicates layer K-1's entries, issue #18; we do not).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxprune.models.attention import attention_rows
from jaxprune.reducers._core import select_topk
from jaxprune.reducers.base import BudgetError, check_budget
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase, check_layer
from jaxprune.reducers.registry import register


@dataclasses.dataclass(frozen=True)
class FastV(LLMReducerBase):
    layer: int = 2
    keep: int | None = None
    ratio: float | None = None  # drop ratio R (used when keep is None)
    positions: ClassVar[str] = "keep"

    def __post_init__(self):
        check_layer("FastV", self.layer)
        if (self.keep is None) == (self.ratio is None):
            raise BudgetError("FastV: give exactly one of keep= (tokens kept) or ratio= (fraction dropped)")
        if self.keep is not None:
            check_budget("FastV.keep", self.keep)
        elif not 0.0 <= self.ratio < 1.0:
            raise BudgetError(f"FastV.ratio={self.ratio} must be in [0, 1)")

    def output_visual(self, available: int) -> int:
        if self.keep is not None:
            return check_budget("FastV.keep", self.keep, available)
        return max(1, int(round(available * (1.0 - self.ratio))))

    def scores(self, ctx: LLMContext) -> jnp.ndarray:  # [B, V] mean-head attention of the last token
        q_last = jnp.take_along_axis(ctx.prev_q, ctx.last_index[:, None, None, None], axis=1)  # [B, 1, N, hd]
        T = ctx.valid.shape[1]
        causal = ctx.valid & (jnp.arange(T)[None] <= ctx.last_index[:, None])
        p = attention_rows(q_last, ctx.prev_k, causal)[:, :, 0, :].mean(axis=1)  # [B, T]
        return jnp.take_along_axis(p, ctx.visual_index, axis=1)

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        k = self.output_visual(ctx.visual_index.shape[1])
        slots, ok = select_topk(self.scores(ctx), k, ctx.visual_valid)  # [B, k] sorted
        tokens = jnp.take_along_axis(ctx.visual_hidden, slots[..., None], axis=1)
        return LLMReduced(slots=slots, tokens=tokens, valid=ok)


def fastv(layer: int = 2, keep: int | None = None, ratio: float | None = None) -> FastV:
    """FastV spec: ``fastv(layer=2, keep=64)`` or ``fastv(layer=2, ratio=0.5)``."""
    return FastV(layer=layer, keep=keep, ratio=ratio)


register("fastv", lambda b, c: fastv(layer=2, keep=b))

__all__ = ["FastV", "fastv"]
