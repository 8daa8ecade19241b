"""VisionDrop, stage B (inside the LLM, progressive): dominant tokens by visual-to-visual attention plus
contextual tokens merged by key similarity, after chosen decoder layers.

Paper: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (VisionDrop, AAAI 2026,
arXiv 2506.22283). Code: Ruixxxx/VisionDrop @ f7a944497d581aa79570f8f79e8ca91b5347a52f,
``llava/model/modeling_llama_visiondrop.py`` (``LlamaModel.visiondrop_forward``: the rank/drop hook and the
decode-time position shift; ``LlamaModel.visiondrop_rank_drop``: the selection and merge), wired by
``llava/eval_visiondrop/model_vqa_loader.py`` (``image_token_ratio_list = [[D+C, 0]] + image_token_list``)
and ``scripts/v1_5/visiondrop_eval/*.sh`` (the only released setting). Stage A (inside CLIP) is
:class:`jaxprune.reducers.visiondrop_vision.VisionDropVision`; :func:`visiondrop` composes both.

Algorithm, after decoder layer ``l`` in ``layer_list`` (stage ``s``), on the current hidden states ``H``,
with ``N`` image tokens present and ``[d_s, c_s]`` = ``image_token_list[s]``:

* Next layer's q/k: ``x = input_layernorm_l(H)`` (0-based layer ``l``), ``q = RoPE(q_proj x)``,
  ``k = RoPE(k_proj x)`` at the current position ids (``needs_next_qk``).
* Visual-to-visual score: ``P = softmax(Q_img K_all^T / sqrt(d) + causal_mask)`` per head, rows = the
  image queries, softmax over the FULL causal row (system prompt, sink and text keys included);
  ``P`` is averaged over heads, restricted to the image-key columns, then averaged over the image
  queries: ``s_j = mean_i mean_h P_h[i, j]`` (attention token ``j`` receives from image tokens; the
  causal mask makes only queries ``i >= j`` contribute).
* Dominant: the top ``d_s`` by ``s_j``, kept in ascending order (boolean-mask select).
* Contextual: the ``N_r = N - d_s`` remaining tokens in ascending order; ``m_i = mean_h k_h[i]`` (the
  post-RoPE next-layer keys, averaged over the key heads), L2-normalised; targets at remaining positions
  ``arange(0, N_r, step)[:c_s]`` with ``step = max(1, N_r // c_s)``; every other remaining token goes to
  ``argmax_c m_i . m_target_c`` (first maximum); ``contextual_c = h_target_c + mean_{i -> c} h_i``
  (just ``h_target_c`` if nothing is assigned; :func:`~jaxprune.reducers._core.merge_into`,
  ``mode="target_plus_mean"``).
* Output: ``[dominant ; contextual]`` (``d_s + c_s`` tokens) in place of the image span, text untouched.
* Positions: re-packed contiguously, ``position_ids = arange(len)`` per row (``positions = "renumber"``).
  At decode the official code shifts each listed layer's position id by ``-(n_s - n_{s+1})``
  (``n_s = d_s + c_s``), i.e. every layer segment has its own contiguous position frame; our machinery
  (:mod:`jaxprune.reducers.llm`) gives each segment exactly that frame.

Released LLaVA-1.5-7B setting (the only one, ``scripts/v1_5/visiondrop_eval``): ``--dominant 42
--contextual 6 --layer_list [8,16,24] --image_token_list [[30,5],[22,4],[16,3]]``: 48 / 35 / 26 / 19 visual
tokens in layers 1-8 / 9-16 / 17-24 / 25-32, average ``(48+35+26+19)*8/32 = 32`` (the README's "32 tokens").
:func:`visiondrop_released` (``visiondrop.released()``) is that schedule.

Other budgets (:func:`visiondrop_schedule`, ``visiondrop.schedule``): the paper's 192/128/64 schedules are
not public. We use the released schedule scaled by ``budget / 32`` (every count multiplied, so the
D:C split and the layers stay; for 64 / 128 / 192 this is exactly the inferred table of our reference
notes, NOT the paper's):

* 64:  84+12 = 96 | [60,10] -> 70 | [44,8] -> 52 | [32,6] -> 38   (average 64)
* 128: 168+24 = 192 | [120,20] -> 140 | [88,16] -> 104 | [64,12] -> 76   (average 128)
* 192: 252+36 = 288 | [180,30] -> 210 | [132,24] -> 156 | [96,18] -> 114   (average 192)

Averaging convention: "retain N tokens" = the average number of visual tokens over the LLM layers,
``sum_l n_l / L`` (the README's 32 for the released setting). Budgets that are not multiples of 32 are
scaled with half-up rounding (average within a token or so). For models with fewer layers (tests) the
cut layers are scaled in proportion (``num_layers=4``: after layers 1 / 2 / 3), which keeps the average
of the same counts.

Deviations from the official code:
  * Scores and merges are float32 (the official code casts the softmax to fp16 before averaging, which
    creates ties); score ties go to the lower index (``torch.topk`` has no defined order); cosine uses key
    norms clamped at 1e-6 (a zero key gives similarity 0 instead of NaN).
  * Grouped-query attention (the official Llama-7B has none): query head ``n`` uses key head
    ``n // (N / Kv)`` (HF ``repeat_kv``); ``metric`` averages the ``Kv`` key heads (``key_states.mean(0)``).
  * The image queries' scores are materialised for the ``N`` image rows only (``O(N * T)`` per head), not
    through an eager ``output_attentions`` pass; the same numbers. Layer ``l``'s queries are projected for
    those rows only (``next_q_rows = "visual"``), its keys for every token.
  * Batches: any padding side (the official code is right padding only); several images in a row form one
    visual pool (the official code handles one image per row). Visual slots a previous stage could not
    fill (``valid=False``) are never dominant, never queries for the score, never targets and never
    merged: the algorithm runs on the valid tokens exactly as if the row had only those (``N_r`` and
    ``step`` count valid remaining tokens); output slots that cannot be filled come back ``valid=False``
    (where the official code would fail).
  * Training mode (the "index before answer" queries) is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from jaxprune.reducers._core import (assign_argmax, complement_indices, cosine_similarity, gather, masked_softmax,
                                     merge_into, select_topk)
from jaxprune.reducers.base import BudgetError, check_budget
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase, check_layer
from jaxprune.reducers.compose import Compose, compose
from jaxprune.reducers.registry import register
from jaxprune.reducers.pyramiddrop import _check_layers, average_visual_tokens, scale_layers
from jaxprune.reducers.visiondrop_vision import VisionDropVision  # stage A

__all__ = ["RELEASED", "VisionDropCut", "schedule_for", "visiondrop", "visiondrop_llm", "visiondrop_released",
           "visiondrop_schedule"]

# Released LLaVA-1.5-7B setting: (dominant, contextual) of stage A, layer_list, image_token_list.
RELEASED = {"dominant": 42, "contextual": 6, "layers": (8, 16, 24), "stages": ((30, 5), (22, 4), (16, 3))}
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class VisionDropCut(LLMReducerBase):
    """One VisionDrop stage-B cut: after ``layer`` decoder layers, ``dominant`` + ``contextual`` visual tokens."""

    layer: int
    dominant: int
    contextual: int
    positions: ClassVar[str] = "renumber"
    needs_next_qk: ClassVar[bool] = True
    next_q_rows: ClassVar[str] = "visual"  # only the image tokens query

    def __post_init__(self):
        name = type(self).__name__
        check_layer(name, self.layer)
        check_budget(f"{name}.dominant", self.dominant)
        check_budget(f"{name}.contextual", self.contextual)

    def output_visual(self, available: int) -> int:
        name = type(self).__name__
        check_budget(f"{name}.dominant", self.dominant, available)
        check_budget(f"{name}.contextual", self.contextual, available - self.dominant)
        return self.dominant + self.contextual

    def scores(self, ctx: LLMContext) -> jnp.ndarray:
        """``[B, V]``: mean over valid image queries and heads of the attention each visual slot receives."""
        q = ctx.next_q.astype(jnp.float32)  # [B, V, N, hd] image queries (next_q_rows = "visual")
        k = ctx.next_k.astype(jnp.float32)  # [B, T, Kv, hd]
        B, V, N, hd = q.shape
        Kv, T = k.shape[2], k.shape[1]
        qg = q.reshape(B, V, Kv, N // Kv, hd)  # query head n uses key head n // (N / Kv), as HF repeat_kv
        logits = jnp.einsum("bvkgh,btkh->bkgvt", qg, k, precision=_HI).reshape(B, N, V, T) / jnp.sqrt(
            jnp.float32(hd))
        causal = jnp.arange(T)[None, None, :] <= ctx.visual_index[:, :, None]  # [B, V, T] key slot <= query slot
        mask = (causal & ctx.valid[:, None, :])[:, None]  # [B, 1, V, T]
        p = masked_softmax(logits, mask).mean(axis=1)  # [B, V, T] head mean
        cols = jnp.take_along_axis(p, ctx.visual_index[:, None, :], axis=2)  # [B, V(q), V(k)] image columns
        qv = ctx.visual_valid[:, :, None]
        n_q = jnp.maximum(ctx.visual_valid.sum(axis=1, dtype=jnp.int32), 1)[:, None]  # [B, 1]
        return jnp.where(qv, cols, 0.0).sum(axis=1) / n_q  # [B, V]

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        V = ctx.visual_index.shape[1]
        self.output_visual(V)
        d, c = self.dominant, self.contextual
        r = V - d
        vv = ctx.visual_valid
        hidden = ctx.visual_hidden  # [B, V, H]

        # ---- dominant: top d by the visual-to-visual score, ascending slot order
        dom, dom_ok = select_topk(self.scores(ctx), d, vv)  # [B, d]

        # ---- remaining: valid ones first, each group ascending
        rest, rest_ok = complement_indices(dom, V, vv)  # [B, r]
        n_rest = rest_ok.sum(axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
        order = _partition(rest_ok, ~rest_ok, n_rest, r)  # [B, r]
        rest = jnp.take_along_axis(rest, order, axis=1)
        rest_ok = jnp.arange(r)[None, :] < n_rest  # prefix mask

        # ---- targets: remaining positions i * step (i < c) of the valid list; unfillable targets take the
        # first free remaining positions (distinct slots, valid=False)
        step = jnp.maximum(n_rest // c, 1)  # [B, 1]
        pos = jnp.arange(r, dtype=jnp.int32)[None, :]  # [1, r]
        is_tgt = rest_ok & (pos % step == 0) & (pos // step < c)  # [B, r]
        n_tgt = is_tgt.sum(axis=1, dtype=jnp.int32)[:, None]
        free = ~is_tgt
        filler = free & (jnp.cumsum(free, axis=1, dtype=jnp.int32) <= c - n_tgt)  # [B, r]
        tpos = _partition(is_tgt, filler, n_tgt, c)  # [B, c] valid targets first, then fillers, ascending
        tgt = jnp.take_along_axis(rest, tpos, axis=1)  # [B, c] slots
        tgt_ok = jnp.arange(c)[None, :] < n_tgt  # [B, c]

        # ---- assign the other valid remaining tokens to the most similar target (head-mean post-RoPE keys)
        metric = ctx.visual(ctx.next_k).astype(jnp.float32).mean(axis=2)  # [B, V, hd]
        sim = cosine_similarity(gather(metric, rest), gather(metric, tgt))  # [B, r, c]
        assign = assign_argmax(sim, tgt_ok)  # [B, r]
        ctx_tokens = merge_into(gather(hidden, tgt), gather(hidden, rest), assign,
                                dropped_valid=rest_ok & ~is_tgt, mode="target_plus_mean")  # [B, c, H]

        slots = jnp.concatenate([dom, tgt], axis=1)  # [B, d + c], distinct
        tokens = jnp.concatenate([gather(hidden, dom), ctx_tokens], axis=1)
        valid = jnp.concatenate([dom_ok, tgt_ok], axis=1)
        return LLMReduced(slots=slots, tokens=tokens, valid=valid)


def _partition(first: jnp.ndarray, second: jnp.ndarray, n_first: jnp.ndarray, size: int) -> jnp.ndarray:
    """Indices ``[B, size]`` of the True entries of ``first`` then of ``second`` (disjoint ``[B, n]`` masks),
    each group in ascending order; ``n_first [B, 1]`` = count of ``first``. Entries past ``size`` are dropped
    (a stable partition by scatter, cheaper to compile than a sort)."""
    b, n = first.shape
    p1 = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
    p2 = n_first + jnp.cumsum(second, axis=1, dtype=jnp.int32) - 1
    dest = jnp.where(first, p1, jnp.where(second, p2, size))  # [B, n]; size = not placed
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return jnp.zeros((b, size), jnp.int32).at[jnp.arange(b)[:, None], dest].set(iota, mode="drop")


# ---------------------------------------------------------------------------------------------------
def _stage_pairs(name: str, stages) -> tuple[tuple[int, int], ...]:
    out = []
    for st in stages:
        if not (isinstance(st, (tuple, list)) and len(st) == 2):
            raise BudgetError(f"{name}: every stage must be a [dominant, contextual] pair, got {st!r}")
        out.append((check_budget(f"{name} dominant", st[0]), check_budget(f"{name} contextual", st[1])))
    return tuple(out)


def visiondrop_llm(layers=RELEASED["layers"], stages=RELEASED["stages"], start: int | None = None) -> Compose:
    """Stage B alone: ``compose(VisionDropCut(l_1, *stages[0]), ...)`` (``--layer_list`` and
    ``--image_token_list``). ``start`` (optional) = visual tokens entering the LLM, to check eagerly that
    the schedule never grows (the model checks it again at run time)."""
    layers = _check_layers("visiondrop", layers)
    stages = _stage_pairs("visiondrop", stages)
    if len(stages) != len(layers):
        raise BudgetError(f"visiondrop: {len(layers)} layers but {len(stages)} [dominant, contextual] stages")
    prev = start
    for d, c in stages:
        if prev is not None and d + c > prev:
            raise BudgetError(f"visiondrop: the schedule grows the visual token count ({prev} -> {d + c}); "
                              f"stages must be non-increasing")
        prev = d + c
    return compose(*(VisionDropCut(layer=l, dominant=d, contextual=c) for l, (d, c) in zip(layers, stages)))


def visiondrop(dominant: int = RELEASED["dominant"], contextual: int = RELEASED["contextual"],
               layers=RELEASED["layers"], stages=RELEASED["stages"], vision_layer: int | None = None) -> Compose:
    """Full VisionDrop: stage A (``VisionDropVision(dominant, contextual)``, CLS counted in ``dominant``)
    then one :class:`VisionDropCut` per ``layers`` / ``stages`` entry. Defaults = the released setting."""
    a = VisionDropVision(dominant=dominant, contextual=contextual, vision_layer=vision_layer)
    return compose(a, visiondrop_llm(layers, stages, start=dominant + contextual))


def schedule_for(budget: int, num_layers: int = 32) -> dict:
    """The schedule for an average of ``budget`` visual tokens: the released one times ``budget / 32``
    (half-up rounding, counts >= 1), layers scaled to ``num_layers``. Returns ``dict(dominant, contextual,
    layers, stages, average)``."""
    check_budget("visiondrop_schedule.budget", budget)
    f = budget / 32

    def sc(n: int) -> int:
        return max(1, int(n * f + 0.5))

    stages = tuple((sc(d), sc(c)) for d, c in RELEASED["stages"])
    layers = RELEASED["layers"] if num_layers == 32 else scale_layers(RELEASED["layers"], num_layers)
    out = {"dominant": sc(RELEASED["dominant"]), "contextual": sc(RELEASED["contextual"]), "layers": layers,
           "stages": stages}
    if out["dominant"] < 2:
        raise BudgetError(f"visiondrop_schedule: budget={budget} is too small (stage A needs CLS + one patch)")
    out["average"] = average_visual_tokens(out["dominant"] + out["contextual"], layers,
                                           [d + c for d, c in stages], num_layers)
    return out


def visiondrop_schedule(budget: int, num_layers: int = 32, vision_layer: int | None = None) -> Compose:
    """Full VisionDrop for an average of ``budget`` visual tokens over the LLM layers (see the module
    docstring; 32 = the released setting, 64/128/192 = the released one scaled, NOT the paper's)."""
    s = schedule_for(budget, num_layers)
    return visiondrop(s["dominant"], s["contextual"], s["layers"], s["stages"], vision_layer)


def visiondrop_released(num_layers: int = 32, vision_layer: int | None = None) -> Compose:
    """The released LLaVA-1.5 setting (42 + 6; [8,16,24]; [[30,5],[22,4],[16,3]]; average 32)."""
    return visiondrop_schedule(32, num_layers, vision_layer)


visiondrop.released = visiondrop_released  # type: ignore[attr-defined]
visiondrop.schedule = visiondrop_schedule  # type: ignore[attr-defined]
register("visiondrop", lambda b, c: visiondrop_schedule(b, num_layers=c.text.num_hidden_layers))
