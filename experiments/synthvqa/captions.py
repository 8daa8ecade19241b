"""Caption alignment, LLaVA's stage 1 for the synthetic-VQA model: image -> caption text, projector trained.

LLaVA-1.5 pretrains its projector on image-caption pairs with the CLIP tower and the LLM frozen (the ``plain``
template: the image tokens, then the caption, loss on the caption), so that projected visual tokens land where the
LLM's word embeddings are. Ours does the same on captions generated from the scene, in the words the model's
tokenizer already has::

    "a red circle in the top left . a blue square in the center ."

(every object in cell order; nothing in a caption is a question or an answer). :func:`caption_pool` tokenises them
as ``<s> <image> x P caption </s>`` with next-token labels on the caption and ``</s>``; :func:`caption_loss` is the
cross-entropy of a batch on frozen-tower features. Which parameter groups move is the caller's choice
(``experiments/synthvqa/train.py --caption-train projector``: LLaVA's stage 1; ``projector,language`` lets the
from-scratch LM learn the caption language as well, since unlike LLaVA's Vicuna it knows no language yet).
"""

from __future__ import annotations

import numpy as np

from jaxprune.eval.synthvqa.scene import POSITIONS, Scene
from jaxprune.processing import IMAGE_TOKEN, expand_image_tokens


def caption(scene: Scene) -> str:
    """The caption of a scene: ``"a {colour} {shape} in the {position} ."`` per object, in cell order."""
    return " ".join(f"a {o.colour} {o.shape} in the {POSITIONS[o.cell]} ." for o in scene.objects)


def caption_pool(scenes: list[Scene], tok, image_token_id: int, n_visual: int, length: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids [N, T], labels [N, T], valid [N, T])`` of the captions of ``scenes`` (right padded to ``length`` or
    the longest; labels ``ids[t + 1]`` on the caption and ``</s>``, else -1)."""
    eos = tok.convert_tokens_to_ids("</s>")
    unk = tok.convert_tokens_to_ids("<unk>")
    rows = []
    for sc in scenes:
        ids = tok(expand_image_tokens(IMAGE_TOKEN + "\n" + caption(sc), n_visual))["input_ids"] + [eos]
        ids = np.asarray(ids, np.int32)
        if int((ids == image_token_id).sum()) != n_visual:
            raise ValueError(f"caption row has {int((ids == image_token_id).sum())} image tokens, expected {n_visual}")
        if unk in ids.tolist():
            raise ValueError(f"caption {caption(sc)!r} has words outside the tokenizer's vocabulary")
        rows.append(ids)
    T = max(len(r) for r in rows) if length is None else length
    if any(len(r) > T for r in rows):
        raise ValueError(f"a caption row is longer than length={T}")
    ids = np.zeros((len(rows), T), np.int32)
    labels = np.full((len(rows), T), -1, np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        valid[i, :len(r)] = True
        last_img = int(np.flatnonzero(r == image_token_id)[-1])
        labels[i, last_img:len(r) - 1] = r[last_img + 1:]  # predict every caption word and </s>
    return ids, labels, valid


def caption_loss(m, feats, ids, labels, valid):
    """Mean caption cross-entropy and teacher-forced token accuracy on frozen-tower features ``feats [B, P, Dv]``
    (the LLaVA module ``m``; full-length positions). Device side, differentiable in ``m``'s parameters."""
    import jax.numpy as jnp

    from experiments.train.loss import token_xent
    from jaxprune.engine import decoder as gen

    emb = m.merge(ids, m.projector(feats))  # [B, T, H]
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    logits = gen.full_logits(m, emb, pos, valid)
    loss, n, hits = token_xent(logits, labels)
    return loss, hits / jnp.maximum(n, 1)
