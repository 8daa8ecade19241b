"""Training-time visual-token reduction: random subsets of the image's tokens, dropped or merged, so the decoder of
the synthetic-VQA LLaVA learns to read content rather than the layout of a fixed 144-token span (issue #16).

Per training row, with probability ``prob``, a keep count ``k`` is drawn log-uniformly in ``[min_keep, P]`` and a
uniformly random set of ``k`` patches is kept. The row is then reduced in one of three ways (drawn per row):

* **drop, renumbered positions** (what every pre-LLM reducer gives the LLM: a shorter sequence);
* **drop, kept positions** (``keep_positions_prob``: the kept tokens keep their original position ids, as FastV);
* **merge** (``merge_prob``, renumbered): every dropped patch is averaged into its nearest kept patch on the grid
  (Chebyshev distance, ties to the lower index), each kept slot holding the mean of its group (the merged tokens of
  ToMe / VisionZip's contextual tokens / PruMerge).

Everything stays static-shape: the sequence keeps its ``P`` image slots, dropped slots are marked invalid (out of
attention; no loss on them) and the positions are recomputed on the host; merging is one ``[P, P]`` row-stochastic
matrix per row applied to the projected tokens on the device (:func:`mix_tokens`). Answers whose evidence is gone
(every patch the question is about was dropped, not merged) get no answer loss: the model is not taught to answer
questions it cannot see. The choice of patches never looks at the question (uniformly random): the augmentation
has no reducer's signal in it.

v11 options (off by default, so the v10 recipe is unchanged):

* ``object_bias`` (share of the reduced rows): the ``k`` patches are drawn with a Gumbel top-k whose scores add
  ``s * beta`` on object patches (``s = +1`` or ``-1`` with equal odds, ``beta ~ U(0, max_bias)``), so the kept
  share of object tokens ranges from almost none to almost all. Under uniform draws that share is a fixed function
  of the scene, and the v10 model learned to read "how many" from it (issue #16's count/share defect); mixing both
  signs decouples share and count without favouring any reducer's ranking (the sign is a coin flip, not a signal
  about the question).
* ``evidence="every_object"``: an answer also gets no loss when *any* object it is about lost all its tokens (a
  "how many" over three objects of which one is gone has another visible answer); ``"any"`` (v10): only when all
  of its patches are gone. Objects are told apart by the caller's ``groups`` (one object per 3x3 cell here).

v12 option:

* ``bias_per="object"``: the Gumbel bias is drawn per object (its own sign and ``beta``), not once for all objects
  of the row (``"all"``, v11). With one shared bias every object keeps about the same share of its tokens, so the
  share of *one colour's* tokens among the kept ones still moves with how many objects have that colour, and the v11
  model still read "how many red objects" from it: keeping every patch of the asked colour and thinning the rest
  (the synthvqa oracle) made it answer one more than the truth. Independent per-object biases make a colour's share
  vary for a fixed count. Still question-blind: the draws never look at what is asked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


#: answer-masking rules of :class:`ReductionAug` (module docstring)
EVIDENCE: tuple[str, ...] = ("any", "every_object")
#: how the object bias of :class:`ReductionAug` is drawn (module docstring)
BIAS_PER: tuple[str, ...] = ("all", "object")


@dataclasses.dataclass(frozen=True)
class ReductionAug:
    """How often and how hard training rows are reduced (``prob=0``: never, the original recipe)."""

    prob: float = 0.0
    min_keep: int = 8
    merge_prob: float = 0.3
    keep_positions_prob: float = 0.3
    object_bias: float = 0.0
    max_bias: float = 5.0
    evidence: str = "any"
    bias_per: str = "all"

    def __post_init__(self):
        if self.evidence not in EVIDENCE:
            raise ValueError(f"ReductionAug.evidence={self.evidence!r}: expected one of {EVIDENCE}")
        if self.bias_per not in BIAS_PER:
            raise ValueError(f"ReductionAug.bias_per={self.bias_per!r}: expected one of {BIAS_PER}")
        if self.max_bias < 0:
            raise ValueError(f"ReductionAug.max_bias={self.max_bias} must be >= 0")
        for name in ("prob", "merge_prob", "keep_positions_prob", "object_bias"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ReductionAug.{name}={v} must be in [0, 1]")
        if self.merge_prob + self.keep_positions_prob > 1.0:
            raise ValueError("ReductionAug: merge_prob + keep_positions_prob must be <= 1")
        if self.min_keep < 1:
            raise ValueError(f"ReductionAug.min_keep={self.min_keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class RowReduction:
    """The sampled reduction of a batch (host arrays)."""

    keep: np.ndarray      # [B, P] bool: image slots that stay valid
    mix: np.ndarray       # [B, P, P] float32: slot p's token = sum_q mix[p, q] * token_q (identity when no merge)
    renumber: np.ndarray  # [B] bool: positions renumbered over the valid tokens (else the original ones)
    n_keep: np.ndarray    # [B] int32: kept image slots (P: row not reduced)


def random_keep(rng: np.random.Generator, n_rows: int, grid: int, k: int) -> RowReduction:
    """Every row keeps ``k`` uniformly random patches, dropped and renumbered (the ``random`` reducer's
    condition; validation of robustness during training)."""
    P = grid * grid
    if not 1 <= k <= P:
        raise ValueError(f"k={k} must be in [1, {P}]")
    keep = np.zeros((n_rows, P), bool)
    for b in range(n_rows):
        keep[b, rng.choice(P, k, replace=False)] = True
    mix = np.broadcast_to(np.eye(P, dtype=np.float32), (n_rows, P, P)).copy()
    return RowReduction(keep, mix, np.ones(n_rows, bool), np.full(n_rows, k, np.int32))


def _chebyshev(grid: int) -> np.ndarray:
    yx = np.stack(np.divmod(np.arange(grid * grid), grid), 1)  # [P, 2]
    return np.abs(yx[:, None, :] - yx[None, :, :]).max(-1)  # [P, P]


def sample_reduction(rng: np.random.Generator, n_rows: int, grid: int, aug: ReductionAug,
                     objects: np.ndarray | None = None, groups: np.ndarray | None = None) -> RowReduction:
    """Draw the reduction of ``n_rows`` rows of a ``grid x grid`` image (module docstring); ``objects [B, P]`` bool
    (patches covered by an object) is needed when ``aug.object_bias > 0``, ``groups [P]`` (object id of each patch)
    when ``aug.bias_per == "object"`` too."""
    P = grid * grid
    if aug.object_bias > 0 and (objects is None or objects.shape != (n_rows, P)):
        raise ValueError(f"ReductionAug.object_bias needs objects [{n_rows}, {P}], got "
                         f"{None if objects is None else objects.shape}")
    per_object = aug.object_bias > 0 and aug.bias_per == "object"
    if per_object:
        if groups is None or np.shape(groups) != (P,):
            raise ValueError(f'ReductionAug.bias_per="object" needs groups [{P}], got '
                             f"{None if groups is None else np.shape(groups)}")
        gid = np.unique(groups, return_inverse=True)[1].reshape(P)  # [P] dense object ids
        n_g = int(gid.max()) + 1
    if aug.min_keep > P:
        raise ValueError(f"ReductionAug.min_keep={aug.min_keep} exceeds the {P} image tokens")
    keep = np.ones((n_rows, P), bool)
    mix = np.broadcast_to(np.eye(P, dtype=np.float32), (n_rows, P, P)).copy()
    renumber = np.ones(n_rows, bool)
    n_keep = np.full(n_rows, P, np.int32)
    dist = None
    for b in range(n_rows):
        if rng.random() >= aug.prob:
            continue
        k = int(np.clip(round(float(np.exp(rng.uniform(np.log(aug.min_keep), np.log(P))))), aug.min_keep, P))
        if aug.object_bias > 0 and rng.random() < aug.object_bias:
            if per_object:
                bias = np.where(rng.random(n_g) < 0.5, 1.0, -1.0) * rng.uniform(0.0, aug.max_bias, n_g)  # [G]
                score = rng.gumbel(size=P) + bias[gid] * objects[b]
            else:
                sign = 1.0 if rng.random() < 0.5 else -1.0
                score = rng.gumbel(size=P) + sign * rng.uniform(0.0, aug.max_bias) * objects[b]
            kept = np.sort(np.argsort(-score, kind="stable")[:k])
        else:
            kept = np.sort(rng.choice(P, k, replace=False))
        keep[b] = False
        keep[b, kept] = True
        n_keep[b] = k
        u = rng.random()
        if u < aug.merge_prob:
            dist = _chebyshev(grid) if dist is None else dist
            owner = kept[np.argmin(dist[:, kept], axis=1)]  # [P] nearest kept patch (lowest index on ties)
            m = np.zeros((P, P), np.float32)
            m[owner, np.arange(P)] = 1.0
            m[kept] /= m[kept].sum(1, keepdims=True)
            mix[b] = np.where(keep[b][:, None], m, np.eye(P, dtype=np.float32))
        elif u < aug.merge_prob + aug.keep_positions_prob:
            renumber[b] = False
    return RowReduction(keep, mix, renumber, n_keep)


def reduce_rows(red: RowReduction, ids: np.ndarray, valid: np.ndarray, image_token: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """``(valid [B, T], positions [B, T])`` of right-padded rows with one image each after the reduction: dropped
    image slots invalid, positions renumbered over the valid tokens or kept (``arange``)."""
    B, T = ids.shape
    is_img = (ids == image_token) & valid  # [B, T]
    P = red.keep.shape[1]
    if not (is_img.sum(1) == P).all():
        raise ValueError(f"every row needs exactly {P} image tokens, got {sorted(set(is_img.sum(1).tolist()))}")
    slot = np.cumsum(is_img, axis=1) - 1  # [B, T] image slot index at image tokens
    dropped = is_img & ~np.take_along_axis(red.keep, np.clip(slot, 0, P - 1), axis=1)
    v2 = valid & ~dropped
    renum = np.maximum(np.cumsum(v2, axis=1) - 1, 0).astype(np.int32)
    pos = np.where(red.renumber[:, None], renum, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))
    return v2, pos.astype(np.int32)


def visible_targets(red: RowReduction, atarget: np.ndarray) -> np.ndarray:
    """``atarget [B, R, P]`` (the patches each answer is about) moved onto the reduced slots: slot ``p`` holds
    evidence when it is kept and its (merged) token includes a target patch."""
    carried = np.einsum("bpq,brq->brp", red.mix > 0, atarget > 0)  # [B, R, P]
    return ((carried > 0) & red.keep[:, None, :]).astype(np.float32)


def answer_index(labels: np.ndarray) -> np.ndarray:
    """``[B, T]`` int32: for each labelled token, which answer of its row it belongs to (runs of ``labels >= 0``
    in order), -1 elsewhere."""
    on = labels >= 0
    start = on & ~np.concatenate([np.zeros_like(on[:, :1]), on[:, :-1]], axis=1)
    idx = np.cumsum(start, axis=1) - 1
    return np.where(on, idx, -1).astype(np.int32)


def mask_unseen_answers(labels: np.ndarray, atarget: np.ndarray, visible: np.ndarray,
                        groups: np.ndarray | None = None) -> np.ndarray:
    """``labels`` with the tokens of answers whose target patches (non-empty) are all gone set to -1; with
    ``groups [P]`` (object id of each patch), also of answers one of whose objects has no visible patch left."""
    lost = (atarget.sum(-1) > 0) & (visible.sum(-1) == 0)  # [B, R]
    if groups is not None:
        onehot = (np.asarray(groups)[:, None] == np.unique(groups)[None, :]).astype(np.float32)  # [P, G]
        has = (atarget > 0).astype(np.float32) @ onehot > 0  # [B, R, G]
        seen = (visible > 0).astype(np.float32) @ onehot > 0  # [B, R, G]
        lost |= (has & ~seen).any(-1)
    aidx = answer_index(labels)
    R = atarget.shape[1]
    gone = np.take_along_axis(np.concatenate([lost, np.zeros_like(lost[:, :1])], axis=1),
                              np.where((aidx >= 0) & (aidx < R), aidx, R), axis=1)  # [B, T]
    return np.where(gone, -1, labels).astype(labels.dtype)


def mix_tokens(mix: jax.Array, tokens: jax.Array) -> jax.Array:
    """Device side: ``mix [B, P, P] @ tokens [B, P, H]`` -> merged tokens ``[B, P, H]``."""
    return jnp.einsum("bpq,bqh->bph", mix.astype(tokens.dtype), tokens)


def augment_batch(rng: np.random.Generator, batch: dict, aug: ReductionAug, grid: int, image_token: int,
                  groups: np.ndarray | None = None) -> dict:
    """A frozen-tower training batch (``ids``, ``valid``, ``positions``, ``labels``, ``qlabels``, ``atarget``, ...)
    with a sampled reduction applied: new ``valid`` / ``positions``, targets and labels moved onto what is left,
    and ``mix`` for :func:`mix_tokens` (the batch then always carries ``mix``, so one program serves every draw).
    ``object_bias`` reads the batch's ``pcolour [B, P]`` (0 = background); ``evidence="every_object"`` needs
    ``groups [P]``, as does ``bias_per="object"``."""
    if aug.evidence == "every_object" and groups is None:
        raise ValueError('ReductionAug.evidence="every_object" needs groups (object id of each patch)')
    objects = np.asarray(batch["pcolour"]) > 0 if aug.object_bias > 0 else None
    red = sample_reduction(rng, batch["ids"].shape[0], grid, aug, objects, groups)
    valid, pos = reduce_rows(red, batch["ids"], batch["valid"], image_token)
    out = dict(batch, valid=valid, positions=pos, mix=red.mix)
    out["qlabels"] = np.where(valid, batch["qlabels"], -1).astype(batch["qlabels"].dtype)
    if "atarget" in batch:
        vis = visible_targets(red, batch["atarget"])
        out["labels"] = mask_unseen_answers(batch["labels"], batch["atarget"], vis,
                                            groups if aug.evidence == "every_object" else None)
        out["atarget"] = vis
    return out
