"""The one vision-encoder loop every family runs, and the CLS attention signal pre-LLM reducers read.

A family runs its tower through :func:`clip_segment` (layers ``[start, stop)``), cutting between segments where
a vision-stage reducer sits; the unreduced model is the same loop without cuts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.models.attention import attention_rows
from jaxprune.models.llava import LlavaModule


def clip_segment(m: LlavaModule, h: jax.Array, valid: jax.Array | None, start: int, stop: int,
                 kind: str = "image"):
    """CLIP layers ``[start, stop)`` on ``h [N, S, D]`` with key mask ``valid [N, S]`` (None: every token), in the
    tower that encodes ``kind`` ("image" / "video": Video-LLaVA's two towers; one tower elsewhere).

    Returns ``(h, q, k)``: the hidden states and the last layer's queries / keys ``[N, S, heads, hd]``."""
    return m.tower(kind).run(h, start, stop, valid)


def cls_attention(q: jax.Array, k: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Softmax attention of the CLS query (token 0): ``q, k [N, S, heads, hd]`` -> ``[N, heads, S]``."""
    if valid is None:
        valid = jnp.ones(k.shape[:2], bool)
    return attention_rows(q[:, :1], k, valid)[:, :, 0, :]


def received_attention(q: jax.Array, k: jax.Array, valid: jax.Array | None, block: int = 128) -> jax.Array:
    """The [CLS]-free saliency of a tower without a class token (SigLIP): the softmax attention each token
    *receives*, averaged over the valid query tokens, per head. ``q, k [N, S, heads, hd]`` -> ``[N, heads, S]``
    (rows sum to 1 over the valid keys, as a CLS row does). Computed ``block`` query rows at a time (no S x S
    matrix at once)."""
    N, S = k.shape[:2]
    if valid is None:
        valid = jnp.ones((N, S), bool)
    total = None
    for a in range(0, S, block):
        p = attention_rows(q[:, a:a + block], k, valid)  # [N, heads, R, S]
        rv = valid[:, a:a + block].astype(p.dtype)  # [N, R] only valid queries vote
        part = jnp.einsum("nhrs,nr->nhs", p, rv)
        total = part if total is None else total + part
    return total / jnp.maximum(valid.sum(axis=1), 1)[:, None, None].astype(total.dtype)
