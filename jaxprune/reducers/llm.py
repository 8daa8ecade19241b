"""The LLM stage: the decoder run as static segments, cut after chosen layers by in-LLM reducers.

An LLM-stage reducer has ``stage = "llm"`` and ``layer = K`` (cut after K decoder layers, 1 <= K <
num_layers). At the cut it sees an :class:`LLMContext` — the hidden states, the visual slots, the
post-RoPE q/k of layer K-1 (the last one run) and, if it asks (``needs_next_qk``), layer K's post-RoPE
keys of every token and queries of the rows it scores (``next_q_rows``: all tokens, the last valid
token, or the visual slots), computed on the current hidden states — and returns an
:class:`LLMReduced`: which visual tokens go on (``slots`` into the row's visual pool, in output order)
and their hidden states (gathered or merged). The engine (:mod:`jaxprune.engine.cuts`) then

* drops the other visual slots and writes the new visual tokens, in order, into the remaining
  visual slots (so ``[prefix | visual | suffix]`` keeps its layout), text untouched;
* sets positions per the reducer's convention: ``"keep"`` (original RoPE ids of the slots, FastV) or
  ``"renumber"`` (``cumsum(valid) - 1``, PyramidDrop/VisionDrop; at decode each segment keeps its own
  contiguous frame, which is the official codes' per-layer position shift);
* runs layers ``[K, ...)`` on the shorter static sequence with their own, smaller KV cache.

Attention scores are recomputed only for the query rows a method needs
(:func:`~jaxprune.models.attention.attention_rows`); the main attention stays fused. Layer K's queries
are projected only for those rows too (``next_q_rows``): a full-sequence ``q`` at the cut is one extra
``T x H x H`` matmul per cut that XLA cannot prune after the fact (it was 0.35 GFLOP at T = 672 on the
bench config). That work and the rest of the selection are counted by :func:`jaxprune.flops.prefill_cost`
(``llm_cuts``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxprune.reducers.base import BudgetError, ReducerBase, _register


@dataclasses.dataclass
class LLMContext:
    """Decoder state at a cut (``B`` rows, ``T`` tokens, ``V`` visual slots per row)."""

    hidden: jax.Array          # [B, T, H] output of layer K-1 (input of layer K)
    valid: jax.Array           # [B, T] bool
    positions: jax.Array       # [B, T] int32 current RoPE positions
    visual_index: jax.Array    # [B, V] int32 sequence slot of each visual token (sequence order)
    visual_valid: jax.Array    # [B, V] bool
    last_index: jax.Array      # [B] int32 last valid token (the last instruction token)
    prev_q: jax.Array          # [B, T, N, hd] post-RoPE queries of layer K-1
    prev_k: jax.Array          # [B, T, Kv, hd] post-RoPE keys of layer K-1
    next_q: jax.Array | None   # [B, R, N, hd] layer K's post-RoPE queries on ``hidden`` (if needs_next_qk) at
    #                            the reducer's ``next_q_rows``: R = T ("all"), 1 ("last": last_index), V ("visual")
    next_k: jax.Array | None   # [B, T, Kv, hd] layer K's post-RoPE keys of every token (if needs_next_qk)
    normed: jax.Array          # [B, T, H] the final RMSNorm applied to ``hidden`` (DART's space)

    @property
    def visual_hidden(self) -> jax.Array:  # [B, V, H]
        return jnp.take_along_axis(self.hidden, self.visual_index[..., None], axis=1)

    def visual(self, x: jax.Array) -> jax.Array:
        """Gather any per-token array ``[B, T, ...]`` at the visual slots -> ``[B, V, ...]``."""
        idx = self.visual_index.reshape(self.visual_index.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    @property
    def text_valid(self) -> jax.Array:  # [B, T] valid non-visual tokens
        onehot = jnp.zeros_like(self.valid).at[jnp.arange(self.valid.shape[0])[:, None], self.visual_index].set(True)
        return self.valid & ~onehot


_register(LLMContext, ["hidden", "valid", "positions", "visual_index", "visual_valid", "last_index", "prev_q",
                       "prev_k", "next_q", "next_k", "normed"])


@dataclasses.dataclass
class LLMReduced:
    slots: jax.Array   # [B, V'] indices into the visual pool (0..V-1), in output order
    tokens: jax.Array  # [B, V', H] hidden states of the visual tokens that go on
    valid: jax.Array   # [B, V'] bool


_register(LLMReduced, ["slots", "tokens", "valid"])


class LLMReducerBase(ReducerBase):
    """Base for in-LLM cuts: ``layer`` (dataclass field), ``positions`` convention, ``output_visual``."""

    stage: ClassVar[str] = "llm"
    positions: ClassVar[str] = "keep"
    needs_next_qk: ClassVar[bool] = False
    #: rows of ``LLMContext.next_q`` (with ``needs_next_qk``): "all" (every token, ``[B, T, N, hd]``), "last" (the
    #: last valid token, ``[B, 1, N, hd]``) or "visual" (the visual slots in pool order, ``[B, V, N, hd]``)
    next_q_rows: ClassVar[str] = "all"

    def output_visual(self, available: int) -> int:
        """Visual tokens per row after the cut (validates the budget against ``available``)."""
        raise NotImplementedError

    def output_tokens(self, available: int) -> int:
        return self.output_visual(available)


def check_layer(name: str, layer: int, num_layers: int | None = None) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise BudgetError(f"{name}.layer must be a Python int, got {layer!r}")
    hi = "num_layers" if num_layers is None else num_layers
    if layer < 1 or (num_layers is not None and layer >= num_layers):
        raise BudgetError(f"{name}.layer={layer} is outside [1, {hi}): a cut must leave layers on both sides")
    return layer


NEXT_Q_ROWS = ("all", "last", "visual")


def next_q_index(rows: str, last_index: jax.Array, visual_index: jax.Array) -> jax.Array | None:
    """Sequence slots ``[B, R]`` of the ``next_q`` rows a reducer declares (None for "all")."""
    if rows == "all":
        return None
    if rows == "last":
        return last_index[:, None]
    if rows == "visual":
        return visual_index
    raise ValueError(f"next_q_rows={rows!r} is not one of {NEXT_Q_ROWS}")
