"""The one vision-encoder loop and the signals pre-LLM reducers read (CLS attention, text-to-image attention).

Every family runs its tower through :func:`clip_segment` (layers ``[start, stop)``), cutting between segments
where a vision-stage reducer sits; the unreduced model is the same loop without cuts. :func:`text_to_image`
is the query-aware signal of a shallow decoder prefill on the full sequence (ConsensusDrop's cross-attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.engine import decoder as dec
from jaxprune.models.attention import attention_rows
from jaxprune.models.llava import LlavaModule


def clip_segment(m: LlavaModule, h: jax.Array, valid: jax.Array | None, start: int, stop: int):
    """CLIP layers ``[start, stop)`` on ``h [N, S, D]`` with key mask ``valid [N, S]`` (None: every token).

    Returns ``(h, q, k)``: the hidden states and the last layer's queries / keys ``[N, S, heads, hd]``."""
    mask = None if valid is None else valid[:, None, None, :]
    q = k = None
    for i in range(start, stop):
        h, q, k = m.vision.layers[i](h, mask)
    return h, q, k


def cls_attention(q: jax.Array, k: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Softmax attention of the CLS query (token 0): ``q, k [N, S, heads, hd]`` -> ``[N, heads, S]``."""
    if valid is None:
        valid = jnp.ones(k.shape[:2], bool)
    return attention_rows(q[:, :1], k, valid)[:, :, 0, :]


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
