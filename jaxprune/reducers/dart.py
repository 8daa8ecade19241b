"""DART: after layer K, keep the visual tokens least duplicated with a few pivot tokens.

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(arXiv 2502.11494, EMNLP'25). The official repository (ZichenWen1/DART) was unavailable; we follow its
fork ``xqy1111111/DART`` @ d6a5af6 (HEAD; the function is unchanged since 9fee9fa, 2025-03-19),
``llava/model/language_model/modeling_llama_self.py``: ``DART.get_retained_image_token`` and the hook
in ``DART.forward`` (defaults from ``llava/eval/model_vqa_loader.py``: ``--pruned_layer 2``,
``--max_num_trunction 128``, ``--pivot_image_token 4``, ``--pivot_text_token 4``). Cross-checked with
``ModelTC/llmc`` @ 942745f, ``llmc/compression/token_reduction/dart.py::get_retained_image_token``
(same loop).

Algorithm (at the cut after layer ``K``; ``P_i`` image and ``P_t`` text pivots, budget ``keep``):

1. ``k_j = flatten_heads(K^{(K-1)}_j)`` -- the post-RoPE keys of layer ``K-1`` (``ctx.prev_k``);
   ``||k_j||_1`` over heads and head dims. Image pivots: the top ``P_i`` visual tokens by
   ``||k_j||_1``; text pivots: the top ``P_t`` text tokens *after the image* by ``||k_j||_1``.
2. ``h_j = RMSNorm_final(x_j)`` with ``x`` the hidden state entering layer ``K`` (``ctx.normed``).
3. ``TOKEN_TOPK = keep // (P_i + P_t)``. Candidates ``C`` = the image tokens minus the image pivots.
   For each pivot ``p`` in the official iteration order (below): take the ``TOKEN_TOPK`` tokens of
   ``C`` with the lowest ``cos(h_p, h_j)``, add them to the kept set, remove them from ``C``.
4. Drop the text pivots. Kept = image pivots + selected, sorted: exactly
   ``P_i + (P_i + P_t) * (keep // (P_i + P_t))`` tokens -- "128" keeps 4 + 8 * 16 = **132**, which
   :meth:`DART.output_visual` reports (it is the number of visual slots after the cut).

Positions: ``keep`` -- the kept tokens keep their original RoPE ids (``position_ids = keep_indexs``).

Parity hazard -- the pivot order. The greedy loop is order-dependent (a pivot only sees candidates
the earlier ones left) and the official code iterates ``list(indices_set)``, the Python ``set`` of
the pivots' absolute sequence indices (``35 + offset`` for LLaVA-1.5). CPython iterates a set in
hash-table slot order, and ``hash(i) = i`` lands in slot ``i mod table_size`` (plus probing); for 8
keys the table has 32 slots, so the order is neither ascending nor insertion order once indices
exceed 31 -- i.e. always for LLaVA (``set([100, 40, 300, 500, 620, 650, 660, 700])`` iterates
``[100, 40, 650, 620, 300, 500, 660, 700]``). We therefore reproduce CPython's set exactly
(``order="cpython"``, the default): the pivots are inserted in the official order (image pivots by
decreasing L1, then text pivots by decreasing L1, as ``topk(...).indices.tolist()`` gives them), with
CPython's open addressing (linear probes of 9, then ``i = 5i + 1 + (perturb >>= 5)``) and resizes
(``fill * 5 >= mask * 3`` -> ``used * 4``); the keys are the tokens' RoPE positions, i.e. the official
absolute indices of a batch-1 sequence. The emulation is checked against the running interpreter
(CPython 3.11) in the tests; to our knowledge the probing and resize code is the same in 3.10, the
LLaVA environment's version. ``order="ascending"``
(sorted sequence index) is the alternative a reader might expect. The fork's initial commit 0247657
iterated ``list(indices_set.copy())`` instead -- the same order for 1-4 and 8-12 pivots (checked), a
different one for 5-7 (the copy gets a 16-slot table).

Deviations from the official code:

* Batches of any size with padding (the official code is batch 1 with hard-coded
  ``image_token_start_index=35`` and ``image_token_length=576``); the visual tokens are the row's
  visual pool, the text candidates the valid non-visual tokens after its last visual slot.
* Ties (``torch.topk`` leaves their order unspecified) go to the lower index; cosine similarity in
  float32 with norms clamped at 1e-6 (``torch.nn.functional.cosine_similarity`` uses 1e-8).
* Rows with too few valid tokens (fewer than ``P_t`` text tokens after the image, or fewer valid
  visual tokens than the budget; the official code would raise in ``topk``): missing pivots are
  skipped, and the unfilled output slots come back with ``valid=False``. A missing pivot still takes
  part in the set-order emulation with a distinct dummy key ``2**24 + pivot_id``.
* The keys are the grouped-query keys (``[Kv * hd]``); the official code reads them after
  ``repeat_kv`` (``[N * hd]``), which multiplies every L1 norm by ``N / Kv``: same ranking. LLaVA-1.5
  is multi-head anyway. (llmc reshapes the permuted keys with ``shape[1]`` = heads instead of the
  sequence length; we flatten over heads as the fork does.)
* Only the ``max_num_trunction`` budget (``keep``; ``TOKEN_TOPK = ceil(keep // 8)`` = ``keep // 8``);
  the ``reduction_ratio`` fallback used when it is None (``ceil(576 * (1 - ratio) // 8)``) and the
  fork's LLaVA-NeXT branch (``retain_token_num_for_llava_next``) are not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.reducers._core import cosine_similarity, select_topk
from jaxprune.reducers.base import BudgetError, check_budget
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase, check_layer
from jaxprune.reducers.registry import register

_ORDERS = ("cpython", "ascending")
_LINEAR_PROBES = 9   # CPython Objects/setobject.c
_PERTURB_SHIFT = 5
_DUMMY_KEY = 1 << 24


# ---------------------------------------------------------------------------------------------------
# CPython set iteration order (static schedule, traced keys)
def _table_size(minused: int) -> int:
    size = 8  # PySet_MINSIZE
    while size <= minused:
        size <<= 1
    return size


def _set_schedule(n: int) -> list[int | None]:
    """Static growth of ``set(keys)`` for ``n`` distinct keys: for insertion ``j`` the table size it
    is resized to afterwards, or None."""
    size, resizes = 8, []
    for fill in range(1, n + 1):
        if fill * 5 >= (size - 1) * 3:
            size = _table_size(fill * 4)
            resizes.append(size)
        else:
            resizes.append(None)
    return resizes


def _probe(occupied: jax.Array, key: jax.Array) -> jax.Array:
    """Slot where CPython's set puts ``key`` (hash = key >= 0) in a table with ``occupied`` slots."""
    size = occupied.shape[0]
    mask = size - 1
    off = jnp.arange(_LINEAR_PROBES + 1, dtype=jnp.int32)

    def body(st):
        i, perturb, _ = st
        linear = i + _LINEAR_PROBES <= mask  # probe i..i+9 only when they do not wrap
        idx = jnp.where(linear, i + off, i)
        empty = ~occupied[idx]
        found = jnp.any(empty)
        slot = jnp.where(found, idx[jnp.argmax(empty)], -1)
        perturb2 = perturb >> _PERTURB_SHIFT
        i2 = (i * 5 + 1 + perturb2) & mask
        return jnp.where(found, i, i2), jnp.where(found, perturb, perturb2), slot

    key = key.astype(jnp.int32)
    return lax.while_loop(lambda st: st[2] < 0, body, (key & mask, key, jnp.int32(-1)))[2]


def _insert_all(table: jax.Array, keys: jax.Array, ids: jax.Array, active: jax.Array) -> jax.Array:
    """Insert pivots ``ids`` (in order; their keys ``keys[id]``; only where ``active``) into ``table``
    (pivot ids, -1 = empty) with CPython's probing."""
    def body(j, table):
        pid = ids[j]
        slot = _probe(table >= 0, keys[jnp.maximum(pid, 0)])
        return jnp.where(active[j], table.at[slot].set(pid), table)

    return lax.fori_loop(0, ids.shape[0], body, table)


def _rebuild(table: jax.Array, keys: jax.Array, size: int) -> jax.Array:
    """CPython's resize into a fresh table: re-insert the entries in old slot order."""
    return _insert_all(jnp.full((size,), -1, jnp.int32), keys, table, table >= 0)


def cpython_set_order(keys: jax.Array) -> jax.Array:
    """Iteration order of ``list(set(keys))`` for distinct non-negative int ``keys [n]`` (given in
    insertion order): a permutation ``[n]`` of ``0..n-1``. Jittable, static shapes; vmap it for batches."""
    n = keys.shape[0]
    resizes = _set_schedule(n)
    table = jnp.full((8,), -1, jnp.int32)
    start = 0
    for j in range(n):
        if resizes[j] is not None or j == n - 1:  # insert the run start..j, then resize if due
            ids = jnp.arange(start, j + 1, dtype=jnp.int32)
            table = _insert_all(table, keys, ids, jnp.ones(ids.shape, bool))
            start = j + 1
            if resizes[j] is not None:
                table = _rebuild(table, keys, resizes[j])
    return table[jnp.argsort(table < 0, stable=True)[:n]]


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DART(LLMReducerBase):
    """DART spec: ``DART(layer=2, keep=128)`` keeps ``4 + 8 * (128 // 8) = 132`` visual tokens."""

    layer: int = 2
    keep: int = 128            # official ``max_num_trunction``
    pivot_image: int = 4
    pivot_text: int = 4
    order: str = "cpython"     # pivot iteration order: "cpython" (official set order) | "ascending"
    positions: ClassVar[str] = "keep"

    def __post_init__(self):
        check_layer("DART", self.layer)
        check_budget("DART.keep", self.keep)
        check_budget("DART.pivot_image", self.pivot_image)
        check_budget("DART.pivot_text", self.pivot_text, allow_zero=True)
        if self.order not in _ORDERS:
            raise ValueError(f"DART.order={self.order!r} is not one of {_ORDERS}")

    @property
    def token_topk(self) -> int:
        """``TOKEN_TOPK = max_num_trunction // (pivot_image + pivot_text)`` (tokens added per pivot)."""
        return self.keep // (self.pivot_image + self.pivot_text)

    def output_visual(self, available: int) -> int:
        n = self.pivot_image + (self.pivot_image + self.pivot_text) * self.token_topk
        if n > available:
            raise BudgetError(f"DART: keep={self.keep} keeps {self.pivot_image} image pivots + "
                              f"{self.pivot_image + self.pivot_text} pivots x {self.token_topk} = {n} tokens, "
                              f"larger than the {available} tokens available")
        return n

    def pivots(self, ctx: LLMContext):
        """The ``P = P_i + P_t`` pivots in the official insertion order -- image pivots then text pivots,
        each by decreasing key L1 norm (``lax.top_k``: ties to the lower index). Returns
        ``(image pivot pool slots [B, P_i], sequence index [B, P], valid [B, P], set key [B, P])``."""
        B, T = ctx.valid.shape
        l1 = jnp.abs(ctx.prev_k.astype(jnp.float32)).reshape(B, T, -1).sum(-1)  # [B, T]
        neg = jnp.float32(-jnp.inf)
        _, img = lax.top_k(jnp.where(ctx.visual_valid, ctx.visual(l1), neg), self.pivot_image)  # [B, Pi]
        img_ok = jnp.take_along_axis(ctx.visual_valid, img, axis=1)
        img_seq = jnp.take_along_axis(ctx.visual_index, img, axis=1)  # [B, Pi] sequence index
        if self.pivot_text:
            after = jnp.arange(T)[None] > ctx.visual_index.max(axis=1, keepdims=True)
            text = ctx.text_valid & after  # official: K_states[0][start + length:]
            _, txt = lax.top_k(jnp.where(text, l1, neg), self.pivot_text)  # [B, Pt]
            txt_ok = jnp.take_along_axis(text, txt, axis=1)
            seq = jnp.concatenate([img_seq, txt], axis=1)
            ok = jnp.concatenate([img_ok, txt_ok], axis=1)
        else:
            seq, ok = img_seq, img_ok
        pid = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
        key = jnp.where(ok, jnp.take_along_axis(ctx.positions, seq, axis=1), _DUMMY_KEY + pid)
        return img, seq, ok, key

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        B, V = ctx.visual_index.shape
        k = self.output_visual(V)
        rows = jnp.arange(B)[:, None]
        img, seq, ok, key = self.pivots(ctx)
        n_piv = seq.shape[1]
        if self.order == "cpython":
            perm = jax.vmap(cpython_set_order)(key.astype(jnp.int32))  # [B, P] pivot ids, iteration order
        else:
            perm = jnp.argsort(jnp.where(ok, seq, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
        h_piv = jnp.take_along_axis(ctx.normed, seq[..., None], axis=1)  # [B, P, H]
        sim = cosine_similarity(h_piv, ctx.visual(ctx.normed))  # [B, P, V] fp32
        is_img_pivot = jnp.zeros((B, V), bool).at[rows, img].set(
            jnp.take_along_axis(ctx.visual_valid, img, axis=1))
        avail = ctx.visual_valid & ~is_img_pivot
        chosen = jnp.zeros((B, V), bool)
        topk = self.token_topk
        if topk:
            def body(j, carry):
                avail, chosen = carry
                p = perm[:, j]  # [B]
                s = jnp.take_along_axis(sim, p[:, None, None], axis=1)[:, 0]  # [B, V]
                p_ok = jnp.take_along_axis(ok, p[:, None], axis=1)  # [B, 1]
                idx, got = select_topk(-s, topk, avail)  # lowest cosine first, ties to the lower index
                pick = jnp.zeros((B, V), bool).at[rows, idx].set(got & p_ok)
                return avail & ~pick, chosen | pick

            avail, chosen = lax.fori_loop(0, n_piv, body, (avail, chosen))
        kept = is_img_pivot | chosen  # [B, V], at most k per row
        # exactly k slots, ascending: every kept slot, then the lowest-index other slots as invalid fillers
        slots, _ = select_topk(kept.astype(jnp.float32), k)
        valid = jnp.take_along_axis(kept, slots, axis=1)
        tokens = jnp.take_along_axis(ctx.visual_hidden, slots[..., None], axis=1)
        return LLMReduced(slots=slots, tokens=tokens, valid=valid)


def dart(layer: int = 2, keep: int = 128, pivot_image: int = 4, pivot_text: int = 4,
         order: str = "cpython") -> DART:
    """DART spec (official defaults): ``dart(layer=2, keep=128)`` -> 132 visual tokens after layer 2."""
    return DART(layer=layer, keep=keep, pivot_image=pivot_image, pivot_text=pivot_text, order=order)


register("dart", lambda b, c: dart(layer=2, keep=b))

__all__ = ["DART", "dart"]
