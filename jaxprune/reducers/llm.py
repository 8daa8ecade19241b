"""The LLM stage: the decoder run as static segments, cut after chosen layers by in-LLM reducers.

An LLM-stage reducer has ``stage = "llm"`` and ``layer = K`` (cut after K decoder layers, 1 <= K <
num_layers). At the cut it sees an :class:`LLMContext` — the hidden states, the visual slots, the
post-RoPE q/k of layer K-1 (the last one run) and, if it asks (``needs_next_qk``), layer K's post-RoPE
keys of every token and queries of the rows it scores (``next_q_rows``: all tokens, the last valid
token, or the visual slots), computed on the current hidden states — and returns an
:class:`LLMReduced`: which visual tokens go on (``slots`` into the row's visual pool, in output order)
and their hidden states (gathered or merged). The machinery then

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

from jaxprune import generate as gen
from jaxprune.models.llava import LlavaModule
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


# ---------------------------------------------------------------------------------------------------
def check_llm_reducers(cfg, reducers: tuple, batch, imgs_per_row: int, visual_per_image: int) -> list[int]:
    """Host-side validation: layers in range and increasing, budgets never growing. Returns V per segment."""
    L = cfg.text.num_hidden_layers
    v = imgs_per_row * visual_per_image
    counts, prev = [v], 0
    for r in (r for r in reducers if r.stage == "llm"):
        name = type(r).__name__
        check_layer(name, r.layer, L)
        if r.layer <= prev:
            raise BudgetError(f"{name}.layer={r.layer}: LLM cuts must be at strictly increasing layers (previous "
                              f"cut after layer {prev})")
        if v == 0:
            raise BudgetError(f"{name}: an in-LLM reducer needs visual tokens in the input")
        nv = r.output_visual(v)
        if nv > v:
            raise BudgetError(f"{name}: the schedule grows the visual token count ({v} -> {nv})")
        counts.append(nv)
        prev, v = r.layer, nv
    return counts


def _visual_slots(is_visual: jax.Array, n: int):
    """Static-count slot indices ``[B, n]`` of the visual tokens in sequence order."""
    order = jnp.argsort(~is_visual, axis=1, stable=True)[:, :n]
    return order.astype(jnp.int32)


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


def _next_qk(m: LlavaModule, r, h, positions, index):
    """Layer ``r.layer``'s post-RoPE keys of every token ``[B, T, Kv, hd]`` and queries of the slots ``index
    [B, R]`` (all tokens when None), on the hidden states ``h`` entering it: the model's own RMSNorm,
    projections and RoPE (:meth:`LlamaAttention.qkv`), called on the rows needed; the unused outputs of
    each call (q and v of the key call, k and v of the query call) are dead code that XLA drops."""
    layer = m.language.layers[r.layer]
    x = layer.input_layernorm(h)
    cos, sin = m.language.rope(positions)
    q, k, _ = layer.self_attn.qkv(x, cos, sin)
    if index is not None:
        take = lambda a: jnp.take_along_axis(a, index[..., None], axis=1)
        q = layer.self_attn.qkv(take(x), take(cos), take(sin))[0]
    return q, k


def _cut(m: LlavaModule, r, h, valid, positions, vis_idx, vis_valid, qk):
    """Apply one cut. Returns the new ``(h, valid, positions, vis_idx, vis_valid)`` and the kept mask
    (over the old sequence; for the mask-equivalence test)."""
    B, T, _ = h.shape
    next_q = next_k = None
    last = gen.last_valid_index(valid)
    if r.needs_next_qk:
        next_q, next_k = _next_qk(m, r, h, positions, next_q_index(r.next_q_rows, last, vis_idx))
    ctx = LLMContext(hidden=h, valid=valid, positions=positions, visual_index=vis_idx, visual_valid=vis_valid,
                     last_index=last, prev_q=qk[0], prev_k=qk[1], next_q=next_q, next_k=next_k,
                     normed=m.language.norm(h))
    red: LLMReduced = r(ctx)
    V, V2 = vis_idx.shape[1], red.slots.shape[1]
    rows = jnp.arange(B)[:, None]
    chosen = jnp.zeros((B, V), bool).at[rows, red.slots].set(True)  # [B, V] pool entries kept
    is_vis = jnp.zeros((B, T), bool).at[rows, vis_idx].set(True)
    drop = jnp.zeros((B, T), bool).at[rows, vis_idx].set(~chosen)
    keep = ~drop  # [B, T]
    T2 = T - V + V2
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :T2].astype(jnp.int32)  # kept slots, in order
    h2 = jnp.take_along_axis(h, order[..., None], axis=1)
    valid2 = jnp.take_along_axis(valid, order, axis=1)
    pos2 = jnp.take_along_axis(positions, order, axis=1)
    vis2 = jnp.take_along_axis(is_vis, order, axis=1)
    new_vis_idx = _visual_slots(vis2, V2)  # remaining visual slots, sequence order
    h2 = h2.at[rows, new_vis_idx].set(red.tokens.astype(h2.dtype))
    valid2 = valid2.at[rows, new_vis_idx].set(red.valid)
    if r.positions == "keep":  # token j keeps the original position of the pool entry it came from
        src = jnp.take_along_axis(vis_idx, red.slots, axis=1)  # [B, V'] old sequence slots
        pos2 = pos2.at[rows, new_vis_idx].set(jnp.take_along_axis(positions, src, axis=1))
    elif r.positions == "renumber":
        pos2 = gen.default_positions(valid2)
    else:
        raise ValueError(f"{type(r).__name__}.positions={r.positions!r} is not 'keep' or 'renumber'")
    return h2, valid2, pos2, new_vis_idx, red.valid, keep & valid


def _segments(m: LlavaModule, llm_reducers: list, h, positions, valid, is_visual, n_visual: int,
              capacity_extra: int | None, mask_only: bool = False):
    """Run the whole decoder with cuts. Returns ``(h, valid, caches, segments)``.

    ``capacity_extra``: None = no caches (forward); else caches of ``T_s + capacity_extra`` per segment.
    ``mask_only``: keep the full sequence and mask dropped tokens out of attention instead of gathering
    (reference semantics for the gather == mask test; only for a single cut of a 'keep'-position
    selection reducer: later cuts would still see the uncut visual pool).
    """
    L = len(m.language.layers)
    vis_idx = _visual_slots(is_visual, n_visual)
    vis_valid = jnp.take_along_axis(valid, vis_idx, axis=1)
    caches, segments, start = [], [], 0
    attn_valid = valid
    for r in list(llm_reducers) + [None]:
        stop = L if r is None else r.layer
        cap = 0 if capacity_extra is None else h.shape[1] + capacity_extra
        h, c, qk = gen.decoder_prefill(m, h, positions, attn_valid, range(start, stop), cap, return_qk=True)
        caches += c
        segments.append(gen.Segment(positions, attn_valid, stop - start))
        if r is None:
            break
        if mask_only:
            _, _, _, _, _, keep = _cut(m, r, h, valid, positions, vis_idx, vis_valid, qk)
            attn_valid = keep
        else:
            h, valid, positions, vis_idx, vis_valid, _ = _cut(m, r, h, valid, positions, vis_idx, vis_valid, qk)
            attn_valid = valid
        start = stop
    return h, attn_valid, caches, segments


def run_llm(m: LlavaModule, llm_reducers: list, h, positions, valid, is_visual=None, n_visual: int = 0,
            mask_only: bool = False):
    """Logits ``[B, T_out, V]`` and the final validity mask of the (possibly cut) sequence."""
    if not llm_reducers:
        return gen.full_logits(m, h, positions, valid), valid
    h, valid, _, _ = _segments(m, llm_reducers, h, positions, valid, is_visual, n_visual, None, mask_only)
    return m.logits(h), valid


def prefill_llm(m: LlavaModule, llm_reducers: list, h, positions, valid, max_new_tokens: int, is_visual=None,
                n_visual: int = 0) -> gen.DecodeState:
    if not llm_reducers:
        return gen.prefill(m, h, positions, valid, max_new_tokens)
    h, _, caches, segments = _segments(m, llm_reducers, h, positions, valid, is_visual, n_visual, max_new_tokens)
    return gen.finish_prefill(m, h, caches, segments, max_new_tokens)
