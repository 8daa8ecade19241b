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
