"""Differentiable LLaVA losses for training: answer-token cross-entropy and the vision tower's per-patch
auxiliary loss, as pure functions of ``(module, arrays)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.engine import decoder as gen
from jaxprune.models.llava import LlavaModule


def token_xent(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean cross-entropy over ``labels >= 0``; also the token count and how many argmax hits.

    ``logits [B, T, V]`` fp32, ``labels [B, T]`` int (-1 = ignored)."""
    mask = labels >= 0
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # [B, T]
    n = jnp.maximum(mask.sum(), 1)
    hits = ((logits.argmax(-1) == safe) & mask).sum()
    return (nll * mask).sum() / n, mask.sum(), hits


def sequence_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B]`` bool: every labelled token of the row is the argmax (teacher-forced exact match)."""
    ok = (logits.argmax(-1) == labels) | (labels < 0)
    return ok.all(axis=-1)


def vision_hidden(m: LlavaModule, pixels: jax.Array) -> jax.Array:
    """CLIP hidden states at the feature layer, CLS included: ``[N, 1+P, Dv]``."""
    return m.vision(pixels, m.cfg.feature_layer_index)[0]


def llava_logits(m: LlavaModule, input_ids: jax.Array, pixels: jax.Array, valid: jax.Array,
                 positions: jax.Array, hidden: jax.Array | None = None) -> jax.Array:
    """Full-sequence logits ``[B, T, V]`` (one image per row); ``hidden`` = :func:`vision_hidden` if already
    computed (so an auxiliary loss on it shares the pass)."""
    h = vision_hidden(m, pixels) if hidden is None else hidden
    if m.cfg.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    emb = m.merge(input_ids, m.projector(h))
    return gen.full_logits(m, emb, positions, valid)
