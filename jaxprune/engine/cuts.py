"""In-LLM cuts: the decoder run as static segments, cut after the layers in-LLM reducers name.

At a cut the reducer (:class:`~jaxprune.reducers.llm.LLMReducerBase`) sees an
:class:`~jaxprune.reducers.llm.LLMContext` and returns an :class:`~jaxprune.reducers.llm.LLMReduced`; this
module drops the other visual slots, writes the new visual tokens in order into the remaining visual slots
(``[prefix | visual | suffix]`` keeps its layout), sets positions per the reducer's convention (``keep`` /
``renumber``) and runs the later layers on the shorter static sequence with their own, smaller KV cache.
Scores are recomputed only for the query rows a method needs, so the main attention stays fused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.engine import decoder as dec
from jaxprune.models.llava import LlavaModule
from jaxprune.reducers.base import BudgetError
from jaxprune.reducers.llm import LLMContext, LLMReduced, check_layer, next_q_index


# ---------------------------------------------------------------------------------------------------
def check_llm_reducers(cfg, reducers: tuple, imgs_per_row: int, visual_per_image: int) -> list[int]:
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


def visual_slots(is_visual: jax.Array, n: int):
    """Static-count slot indices ``[B, n]`` of the visual tokens in sequence order."""
    order = jnp.argsort(~is_visual, axis=1, stable=True)[:, :n]
    return order.astype(jnp.int32)


def next_qk(m: LlavaModule, r, h, positions, index):
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


def cut(m: LlavaModule, r, h, valid, positions, vis_idx, vis_valid, qk):
    """Apply one cut. Returns the new ``(h, valid, positions, vis_idx, vis_valid)`` and the kept mask
    (over the old sequence; for the mask-equivalence test)."""
    B, T, _ = h.shape
    next_q = next_k = None
    last = dec.last_valid_index(valid)
    if r.needs_next_qk:
        next_q, next_k = next_qk(m, r, h, positions, next_q_index(r.next_q_rows, last, vis_idx))
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
    new_vis_idx = visual_slots(vis2, V2)  # remaining visual slots, sequence order
    h2 = h2.at[rows, new_vis_idx].set(red.tokens.astype(h2.dtype))
    valid2 = valid2.at[rows, new_vis_idx].set(red.valid)
    if r.positions == "keep":  # token j keeps the original position of the pool entry it came from
        src = jnp.take_along_axis(vis_idx, red.slots, axis=1)  # [B, V'] old sequence slots
        pos2 = pos2.at[rows, new_vis_idx].set(jnp.take_along_axis(positions, src, axis=1))
    elif r.positions == "renumber":
        pos2 = dec.default_positions(valid2)
    else:
        raise ValueError(f"{type(r).__name__}.positions={r.positions!r} is not 'keep' or 'renumber'")
    return h2, valid2, pos2, new_vis_idx, red.valid, keep & valid


def run_segments(m: LlavaModule, llm_reducers: list, h, positions, valid, is_visual, n_visual: int,
              capacity_extra: int | None, mask_only: bool = False):
    """Run the whole decoder with cuts. Returns ``(h, valid, caches, segments)``.

    ``capacity_extra``: None = no caches (forward); else caches of ``T_s + capacity_extra`` per segment.
    ``mask_only``: keep the full sequence and mask dropped tokens out of attention instead of gathering
    (reference semantics for the gather == mask test; only for a single cut of a 'keep'-position
    selection reducer: later cuts would still see the uncut visual pool).
    """
    L = len(m.language.layers)
    vis_idx = visual_slots(is_visual, n_visual)
    vis_valid = jnp.take_along_axis(valid, vis_idx, axis=1)
    caches, segments, start = [], [], 0
    attn_valid = valid
    for r in list(llm_reducers) + [None]:
        stop = L if r is None else r.layer
        cap = 0 if capacity_extra is None else h.shape[1] + capacity_extra
        h, c, qk = dec.decoder_prefill(m, h, positions, attn_valid, range(start, stop), cap, return_qk=True)
        caches += c
        segments.append(dec.Segment(positions, attn_valid, stop - start))
        if r is None:
            break
        if mask_only:
            _, _, _, _, _, keep = cut(m, r, h, valid, positions, vis_idx, vis_valid, qk)
            attn_valid = keep
        else:
            h, valid, positions, vis_idx, vis_valid, _ = cut(m, r, h, valid, positions, vis_idx, vis_valid, qk)
            attn_valid = valid
        start = stop
    return h, attn_valid, caches, segments


def run_llm(m: LlavaModule, llm_reducers: list, h, positions, valid, is_visual=None, n_visual: int = 0,
            mask_only: bool = False):
    """Logits ``[B, T_out, V]`` and the final validity mask of the (possibly cut) sequence."""
    if not llm_reducers:
        return dec.full_logits(m, h, positions, valid), valid
    h, valid, _, _ = run_segments(m, llm_reducers, h, positions, valid, is_visual, n_visual, None, mask_only)
    return m.logits(h), valid


def prefill_llm(m: LlavaModule, llm_reducers: list, h, positions, valid, max_new_tokens: int, is_visual=None,
                n_visual: int = 0) -> dec.DecodeState:
    if not llm_reducers:
        return dec.prefill(m, h, positions, valid, max_new_tokens)
    h, _, caches, segs = run_segments(m, llm_reducers, h, positions, valid, is_visual, n_visual, max_new_tokens)
    return dec.finish_prefill(m, h, caches, segs, max_new_tokens)
