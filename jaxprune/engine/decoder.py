"""Prefill and greedy decode as pure functions of an NNX LLaVA module and arrays.

* :func:`decoder_prefill` runs layers over a whole sequence and builds each layer's static cache.
* :func:`greedy_decode` is one ``lax.while_loop``: per-row EOS stop (finished rows emit the pad id,
  as HF does), early exit when every row is done, one shared cache write slot per step while RoPE
  positions stay per row, so left- and right-padded prompts of different lengths batch together.

Callers (``jaxprune.model``) jit these with the budget-defining arguments static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import dataclasses

from jaxprune.models import kv_cache
from jaxprune.models.attention import causal_mask
from jaxprune.models.llava import LlavaModule


def default_positions(valid: jax.Array) -> jax.Array:
    """RoPE positions from a validity mask ``[B, T]``: ``cumsum - 1`` (HF generate's rule), 0 on padding."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def last_valid_index(valid: jax.Array) -> jax.Array:
    """Index of the last valid slot per row: ``[B, T] -> [B]``."""
    T = valid.shape[1]
    return jnp.max(jnp.where(valid, jnp.arange(T)[None], 0), axis=1)


def decoder_prefill(m: LlavaModule, h: jax.Array, positions: jax.Array, valid: jax.Array,
                    layers: range, capacity: int, return_qk: bool = False):
    """Run decoder ``layers`` over ``h [B, T, H]``; returns ``(h, caches)`` (caches None if capacity 0),
    plus the last layer's post-RoPE ``(q, k)`` when ``return_qk``."""
    T = h.shape[1]
    slots = jnp.broadcast_to(jnp.arange(T)[None], valid.shape)
    mask = causal_mask(slots, slots, valid)
    cos, sin = m.language.rope(positions)
    caches, qk = [], None
    for i in layers:
        h, c, qk = m.language.layers[i].prefill(h, cos, sin, mask, capacity)
        caches.append(c)
    return (h, caches, qk) if return_qk else (h, caches)


def full_logits(m: LlavaModule, h: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
    """Logits ``[B, T, V]`` of the whole sequence (HF layout)."""
    h, _ = decoder_prefill(m, h, positions, valid, range(len(m.language.layers)), 0)
    return m.logits(h)


@dataclasses.dataclass
class DecodeState:
    """What prefill hands to decode. Per-layer lists allow caches of different capacities per layer
    (segments after an in-LLM cut): each layer has its own ``key_valid [B, S_cap]`` and first free
    write slot ``start_slot`` (a static int)."""

    first_logits: jax.Array            # [B, V] logits of each row's last valid token
    caches: list[kv_cache.LayerCache]  # per layer, [B, S_cap_l, K, H]
    key_valid: list[jax.Array]         # per layer, [B, S_cap_l] bool
    next_pos: list[jax.Array]          # per layer, [B] RoPE position of the first generated token
    start_slot: tuple[int, ...]        # per layer, static

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


jax.tree_util.register_dataclass(DecodeState, data_fields=["first_logits", "caches", "key_valid", "next_pos"],
                                 meta_fields=["start_slot"])


def prefill(m: LlavaModule, h: jax.Array, positions: jax.Array, valid: jax.Array, max_new_tokens: int
            ) -> DecodeState:
    """Prefill embeddings ``h [B, T, H]`` through every layer; caches sized ``T + max_new_tokens``."""
    T = h.shape[1]
    cap = T + max_new_tokens
    n = len(m.language.layers)
    h, caches = decoder_prefill(m, h, positions, valid, range(n), cap)
    return finish_prefill(m, h, caches, [Segment(positions, valid, n)], max_new_tokens)


@dataclasses.dataclass
class Segment:
    """A run of consecutive decoder layers that share one static sequence (after a cut)."""

    positions: jax.Array  # [B, T_s] RoPE positions of the segment's sequence
    valid: jax.Array      # [B, T_s]
    num_layers: int


def finish_prefill(m: LlavaModule, h: jax.Array, caches, segments: list[Segment], max_new_tokens: int
                   ) -> DecodeState:
    """Last-token logits and the decode state. Each segment's layers get their own key mask, first free
    slot and position frame (next position = the segment's last position of the row + 1)."""
    valid = segments[-1].valid
    last = last_valid_index(valid)  # [B]
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, H]
    key_valid, start, next_pos = [], [], []
    for seg in segments:
        T = seg.valid.shape[1]
        pos_last = jnp.max(jnp.where(seg.valid, seg.positions, -1), axis=1)  # [B]
        key_valid += [jnp.pad(seg.valid, ((0, 0), (0, max_new_tokens)))] * seg.num_layers
        start += [T] * seg.num_layers
        next_pos += [pos_last + 1] * seg.num_layers
    return DecodeState(first_logits=m.logits(h_last)[:, 0], caches=caches, key_valid=key_valid,
                       next_pos=next_pos, start_slot=tuple(start))


def greedy_decode(m: LlavaModule, state: DecodeState, max_new_tokens: int, eos_ids: tuple[int, ...],
                  pad_id: int) -> jax.Array:
    """Greedy tokens ``[B, max_new_tokens]`` continuing a prefill ``state``."""
    first_logits, caches, key_valid, next_pos = state.first_logits, state.caches, state.key_valid, state.next_pos
    start_slot = state.start_slot
    B = first_logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits, done):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.any(tok[:, None] == eos[None], axis=1)

    tok0, done0 = pick(first_logits, jnp.zeros((B,), bool))
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)

    def cond(state):
        i, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, done, caches, kvalid, pos = state
        tok = out[:, i - 1]
        h = m.language.embed_tokens(tok[:, None])  # [B, 1, H]
        new_caches, new_valid = [], []
        for li, (layer, c, kv, s0) in enumerate(zip(m.language.layers, caches, kvalid, start_slot)):
            cos, sin = m.language.rope((pos[li] + i - 1)[:, None])  # each segment has its own frame
            slot = jnp.int32(s0) + i - 1
            kv = jax.lax.dynamic_update_slice(kv, jnp.ones((B, 1), bool), (jnp.int32(0), slot))
            h, c = layer.decode(h, cos, sin, c, slot, kv[:, None, None, :])
            new_caches.append(c)
            new_valid.append(kv)
        tok, done = pick(m.logits(h)[:, 0], done)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (jnp.int32(0), i))
        return i + 1, out, done, new_caches, new_valid, pos

    state = (jnp.int32(1), out, done0, caches, key_valid, next_pos)
    return jax.lax.while_loop(cond, body, state)[1]
