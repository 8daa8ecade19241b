"""The text-to-image signal: query-aware attention of a shallow decoder prefill on the full sequence
(ConsensusDrop's cross-attention), handed to families as a callback by :func:`jaxprune.engine.encode`.
The tower loop itself is :func:`jaxprune.models.tower.clip_segment`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.engine import decoder as dec
from jaxprune.models.attention import attention_rows
from jaxprune.models.llava import LlavaModule


def text_to_image(m: LlavaModule, h: jax.Array, positions: jax.Array, valid: jax.Array, is_img: jax.Array,
                  layers: int, query_rows: int, n_img: int, per_image: int) -> jax.Array:
    """Query-aware attention of the prompt's text tokens to each image token at decoder layer ``layers - 1``
    of a shallow prefill on the full sequence ``h [B, T, H]``: the query rows are the valid non-image tokens
    among each row's last ``query_rows`` positions, each attending causally; the result is the mean over
    heads and query rows. ``is_img [B, T]`` marks ``n_img * per_image`` image slots in reading order.
    Returns ``[n_img, per_image]``."""
    h, _ = dec.decoder_prefill(m, h, positions, valid, range(layers - 1), 0)
    layer = m.language.layers[layers - 1]
    cos, sin = m.language.rope(positions)
    q, k, _ = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
    B, T = valid.shape
    last = dec.last_valid_index(valid)
    raw = last[:, None] - jnp.arange(query_rows)[None, ::-1]  # [B, R] may run below 0 on short rows
    rows = jnp.clip(raw, 0, T - 1)
    rvalid = jnp.take_along_axis(valid & ~is_img, rows, axis=1) & (raw >= 0)
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [B, R, N, hd]
    causal = valid[:, None, :] & (jnp.arange(T)[None, None, :] <= rows[:, :, None])  # [B, R, T]
    p = attention_rows(qr, k, causal)  # [B, heads, R, T]
    p = jnp.where(rvalid[:, None, :, None], p, 0.0).sum(axis=(1, 2)) / jnp.maximum(
        rvalid.sum(1)[:, None] * p.shape[1], 1)  # [B, T]
    flat_img = is_img.reshape(-1)
    order = jnp.argsort(~flat_img, stable=True)[: n_img * per_image]
    return p.reshape(-1)[order].reshape(n_img, per_image)
