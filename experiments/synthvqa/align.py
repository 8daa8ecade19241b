"""Word-to-patch alignment term of the synthetic-VQA recipe (issue #16): projected visual tokens near the LLM input
embeddings of the colour / shape words that describe them.

Real LLaVA's projected CLIP tokens land near related word embeddings after stage-1 caption pretraining at scale,
which is what AdaFV's text-to-patch similarity reads. Our 4-layer LM does not get there from captions alone:
measured from the v9 model on ``large`` scenes, the ROC-AUC of ``cos(e_word, v_patch)`` for the word's patches was
0.48 (colour) / 0.60 (shape) before and 0.47 / 0.65 after 300 caption steps (``experiments/results/
synthvqa_training.md``). This term asks for it directly, per image and per word present:

    L = - mean_{b, w present} log sum_{j: patch j shows w} softmax_j(scale * cos(e_w, v_{b, j}))

i.e. the patches showing a colour (shape) should take the softmax mass of that word's similarity over the image's
patches -- a listwise ranking loss, the same ``softmax(scale * cos)`` form AdaFV scores with. It uses only the
scene's per-patch colour / shape labels (never a question or a reducer); the words are the task's 6 colours and
4 shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: temperature of the ranking softmax (cosines are in [-1, 1])
SCALE = 10.0


def word_patch_loss(vis: jax.Array, emb: jax.Array, labels: jax.Array, scale: float = SCALE) -> jax.Array:
    """Listwise word-to-patch ranking loss (module docstring). ``vis [B, P, H]`` projected visual tokens, ``emb
    [W, H]`` input embeddings of the words, ``labels [B, P, W]`` bool: patch ``j`` of image ``b`` shows word ``w``.
    Returns a scalar; 0 when no word is present anywhere."""
    vn = vis / jnp.maximum(jnp.linalg.norm(vis, axis=-1, keepdims=True), 1e-6)  # [B, P, H]
    en = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-6)  # [W, H]
    logp = jax.nn.log_softmax(scale * jnp.einsum("bph,wh->bpw", vn, en), axis=1)  # [B, P, W] over patches
    pos = jax.nn.logsumexp(jnp.where(labels, logp, -jnp.inf), axis=1)  # [B, W]
    has = labels.any(axis=1)  # [B, W]
    return -jnp.where(has, pos, 0.0).sum() / jnp.maximum(has.sum(), 1)


def word_labels(colour: jax.Array, shape: jax.Array, n_colours: int, n_shapes: int) -> jax.Array:
    """``[B, P, C + S]`` bool word labels from per-patch ``colour`` / ``shape`` indices ``[B, P]`` (0 = background,
    ``k`` = the ``k``-th colour / shape, 1-based, as the scene renderer's maps)."""
    c = colour[..., None] == jnp.arange(1, n_colours + 1)  # [B, P, C]
    s = shape[..., None] == jnp.arange(1, n_shapes + 1)  # [B, P, S]
    return jnp.concatenate([c, s], axis=-1)
