"""PyramidDrop: progressive in-LLM drops ranked by the last instruction token's attention.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (arXiv 2410.17247, CVPR'25).
Code: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a, ``llava/model/modeling_llama_pdrop.py``
(``LlamaModel.pdrop_forward``: the rank/drop hook and the decode-time position shift;
``LlamaModel.pdrop_rank_drop``: the selection), ``llava/model/llava_arch.py`` (``image_token_posi``,
``prompt_len``, ``image_tokens``) and ``llava/eval/model_vqa_loader.py`` (``image_token_ratio_list``
gets ``1.0`` prepended; scripts pass ``--layer_list '[8,16,24]' --image_token_ratio_list
"[0.5,0.25,0.125]"``).

Algorithm (inference), after decoder layer ``l`` in ``layer_list`` (stage ``s`` = its index), on the
current hidden states ``H``:

* ``x = input_layernorm_{l}(H)`` of the NEXT layer (0-based index ``l``), ``q = RoPE(q_proj x)``,
  ``k = RoPE(k_proj x)`` at the current position ids.
* ``a = softmax(q_last k^T / sqrt(d) + causal_mask)`` for the last instruction token (the last prompt
  token, ``prompt_len + image_tokens - 1``), per head; ``s_j = mean_h a_h[j]`` over the image columns.
* Counts are relative to the ORIGINAL image token count ``N0`` (``self.image_tokens``, not the current
  one): the stage holds ``int(N0 * r_s)`` tokens and keeps ``int(N0 * r_{s+1})`` (``int`` truncates),
  with ``r = [1.0] + image_token_ratio_list``. Default ``[0.5, 0.25, 0.125]`` of 576 = 288 / 144 / 72.
* Keep the top ``int(N0 * r_{s+1})`` image tokens by ``s_j``, in ascending index order
  (``topk(...).indices.sort()``); text untouched.
* Positions: re-packed contiguously, ``position_ids = arange(len)`` per row (``positions = "renumber"``).
  At decode the official code shifts each listed layer's position id by
  ``-(int(N0 r_s) - int(N0 r_{s+1}))``, i.e. every layer segment has its own contiguous position frame;
  our machinery (:mod:`jaxprune.reducers.llm`) gives each segment exactly that frame.

Here a schedule is a :func:`~jaxprune.reducers.compose.compose` of one :class:`PyramidDropCut` per cut
(``layer`` = cut after that many layers, ``keep`` = the absolute count ``int(N0 * r)``);
:func:`pyramiddrop` builds it from the official ``layer_list`` / ``image_token_ratio_list`` and ``N0``
(``total``), and :func:`pyramiddrop_for_average` (also ``pyramiddrop.for_average``) picks a schedule
whose average visual token count over the LLM layers is a given budget.

Budgets "192 / 128 / 64 tokens" (the average over the 32 layers, ``sum_l n_l / L``, which is how the
PDrop author computes Table 2's "average tokens", issue #22). With the released ``[8,16,24]`` the
first 8 layers always see all 576 tokens, so the average is at least 144 (issue #10). The author's
recipe (issue #29): keep the pyramid ``1, lambda, lambda^2, lambda^3`` and move the cuts earlier, e.g.
``layer_list = [2, 8, 16]`` with ``lambda = 0.19`` for 64 tokens, solving
``N0 * (2 + 6 lambda + 8 lambda^2 + 16 lambda^3) / 32 = budget``. :func:`pyramiddrop_for_average` does
exactly that, with ``layers = (2, 8, 16)`` for every budget by default (scaled to ``num_layers``; one
layer list for all budgets so that 192/128/64 differ only in ``lambda``), solves ``lambda`` by bisection
and then truncates the counts with ``int`` as the official code does. On LLaVA-1.5 (576 tokens, 32
layers) that gives

* 192: ``lambda = 0.5596`` -> 576 / 322 / 180 / 100 visual tokens in layers 1-2 / 3-8 / 9-16 / 17-32
  (average 191.4)
* 128: ``lambda = 0.4197`` -> 576 / 241 / 101 / 42 (average 127.4)
* 64:  ``lambda = 0.1916`` -> 576 / 110 / 21 / 4 (average 63.9)

(those numbers are ours, not the paper's: the paper's 192/128/64 settings are not published).

Deviations from the official code:
  * The score row is computed from layer ``l``'s q/k recomputed by the machinery (``needs_next_qk``,
    the same RMSNorm + projections + RoPE; keys of every token, the query of the last valid token only,
    ``next_q_rows = "last"``) and :func:`~jaxprune.models.attention.attention_rows`; the official code
    does the same one-row matmul. Layer ``l`` then recomputes the keys of the kept tokens (as the official
    code does); :func:`jaxprune.flops.prefill_cost` counts the scoring work (``llm_cuts``). Grouped-query
    attention (the official Llama-7B has none): query head ``n`` uses key head ``n // (N / Kv)``, as HF
    ``repeat_kv``. Scores stay float32 (the official code casts the softmax back to fp16 before averaging and
    ranking, which creates ties), ties go to the lower index.
  * Batches: any padding side (the official code is right padding only), each row's last valid token is
    the query; rows may hold several images: all visual tokens of the row form one pool (the official
    code handles one image per row). Visual slots a previous stage could not fill (``valid=False``) are
    never kept while a valid one remains; leftover slots come back ``valid=False``.
  * Counts are absolute per cut (``keep``), computed once from ``total``; the official code recomputes
    ``int(N0 * r)`` per image from the actual ``N0``. Training mode (all "index before answer" tokens as
    queries) is not implemented.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import jax.numpy as jnp

from jaxprune.models.attention import attention_rows
from jaxprune.reducers._core import select_topk
from jaxprune.reducers.base import BudgetError, check_budget
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase, check_layer
from jaxprune.reducers.compose import Compose, compose
from jaxprune.reducers.registry import final_keeps, register, visual_tokens

__all__ = ["PyramidDropCut", "average_visual_tokens", "pyramiddrop", "pyramiddrop_for_average", "scale_layers"]

OFFICIAL_LAYERS = (8, 16, 24)
OFFICIAL_RATIOS = (0.5, 0.25, 0.125)
AVERAGE_LAYERS = (2, 8, 16)  # the PDrop author's suggestion for low budgets (issue #29), of 32 layers


@dataclasses.dataclass(frozen=True)
class PyramidDropCut(LLMReducerBase):
    """One PyramidDrop cut: after ``layer`` decoder layers keep ``keep`` visual tokens."""

    layer: int
    keep: int
    positions: ClassVar[str] = "renumber"
    needs_next_qk: ClassVar[bool] = True
    next_q_rows: ClassVar[str] = "last"  # only the last instruction token queries

    def __post_init__(self):
        check_layer(type(self).__name__, self.layer)
        check_budget(f"{type(self).__name__}.keep", self.keep)

    def output_visual(self, available: int) -> int:
        return check_budget(f"{type(self).__name__}.keep", self.keep, available)

    def scores(self, ctx: LLMContext) -> jnp.ndarray:
        """``[B, V]``: head-mean attention of the last instruction token (layer K's q/k) to each visual slot."""
        q_last = ctx.next_q  # [B, 1, N, hd]: the machinery projects layer K's query for the last valid token only
        T = ctx.valid.shape[1]
        causal = ctx.valid & (jnp.arange(T)[None] <= ctx.last_index[:, None])  # [B, T]
        p = attention_rows(q_last, ctx.next_k, causal)[:, :, 0, :].mean(axis=1)  # [B, T]
        return jnp.take_along_axis(p, ctx.visual_index, axis=1)  # [B, V]

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        k = self.output_visual(ctx.visual_index.shape[1])
        slots, ok = select_topk(self.scores(ctx), k, ctx.visual_valid)  # [B, k] ascending
        tokens = jnp.take_along_axis(ctx.visual_hidden, slots[..., None], axis=1)  # [B, k, H]
        return LLMReduced(slots=slots, tokens=tokens, valid=ok)


# ---------------------------------------------------------------------------------------------------
def _check_layers(name: str, layers, num_layers: int | None = None) -> tuple[int, ...]:
    layers = tuple(layers)
    if not layers:
        raise BudgetError(f"{name}: layers must name at least one cut")
    prev = 0
    for layer in layers:
        check_layer(name, layer, num_layers)
        if layer <= prev:
            raise BudgetError(f"{name}: layers must be strictly increasing, got {list(layers)}")
        prev = layer
    return layers


def _check_counts(name: str, counts, start: int) -> tuple[int, ...]:
    prev = start
    for c in counts:
        check_budget(f"{name} count", c)
        if c > prev:
            raise BudgetError(f"{name}: the schedule grows the visual token count ({prev} -> {c}); "
                              f"counts must be non-increasing, got {[start, *counts]}")
        prev = c
    return tuple(counts)


def pyramiddrop(layers=OFFICIAL_LAYERS, ratios=OFFICIAL_RATIOS, total: int = 576) -> Compose:
    """PyramidDrop as ``compose(PyramidDropCut(l_1, k_1), ...)`` with ``k_s = int(total * ratios[s])``.

    ``layers`` = the official ``--layer_list`` (cut after that many layers), ``ratios`` = the official
    ``--image_token_ratio_list`` (fractions of the ORIGINAL count ``total``, without the leading 1.0),
    ``total`` = visual tokens that enter the LLM (576 for LLaVA-1.5)."""
    layers = _check_layers("pyramiddrop", layers)
    ratios = tuple(ratios)
    if len(ratios) != len(layers):
        raise BudgetError(f"pyramiddrop: {len(layers)} layers but {len(ratios)} ratios")
    check_budget("pyramiddrop.total", total)
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise BudgetError(f"pyramiddrop: ratios must be in (0, 1], got {list(ratios)}")
    keeps = [int(total * r) for r in ratios]  # official: int(cur_image_token * image_token_ratio_list[s+1])
    if min(keeps) < 1:
        raise BudgetError(f"pyramiddrop: ratios {list(ratios)} of {total} tokens keep {keeps}; every cut must "
                          "keep at least one token")
    _check_counts("pyramiddrop", keeps, total)
    return compose(*(PyramidDropCut(layer=l, keep=k) for l, k in zip(layers, keeps)))


def average_visual_tokens(total: int, layers, counts, num_layers: int) -> float:
    """Average visual tokens over the decoder layers: ``sum_l n_l / num_layers`` with ``total`` tokens
    before the first cut and ``counts[s]`` after cut ``layers[s]``."""
    bounds = [0, *layers, num_layers]
    ns = [total, *counts]
    return sum(n * (b1 - b0) for n, (b0, b1) in zip(ns, itertools.pairwise(bounds))) / num_layers


def scale_layers(layers, num_layers: int, reference: int = 32) -> tuple[int, ...]:
    """Layer list of a ``reference``-layer model moved to ``num_layers`` layers: ``round(l * num_layers /
    reference)``, then forced strictly increasing (each >= previous + 1) and inside ``[1, num_layers)``."""
    out, prev = [], 0
    for layer in layers:
        v = max(math.floor(layer * num_layers / reference + 0.5), prev + 1)
        if v >= num_layers:
            raise BudgetError(f"scale_layers: {list(layers)} of {reference} layers do not fit {num_layers} layers")
        out.append(v)
        prev = v
    return tuple(out)


def pyramiddrop_for_average(budget: int, num_layers: int = 32, total: int = 576, layers=None) -> Compose:
    """PyramidDrop whose average visual token count over ``num_layers`` layers is ``budget`` (to within the
    ``int`` truncation of the counts).

    Rule (the PDrop author's, issue #29): ratios ``lambda, lambda^2, ...`` of ``total`` after the cuts in
    ``layers`` (default ``(2, 8, 16)`` of 32 layers, scaled to ``num_layers`` with :func:`scale_layers`);
    ``lambda`` solves ``sum_s len_s * total * lambda^s = budget * num_layers`` (bisection, ``len_s`` =
    layers in segment ``s``); counts ``int(total * lambda^s)`` as in the official code.

    Reachable averages: ``[avg(total^(-1/m)), total)`` with ``m`` cuts (below, the last stage would keep no
    token): 51.6 for (2, 8, 16) of 32 layers; 83.2 on an 8-layer decoder (cuts after 1, 2, 4), where 64 is
    out of reach -- the first layer alone contributes ``576 / 8 = 72``. Raises :class:`BudgetError` outside."""
    check_budget("pyramiddrop_for_average.budget", budget)
    check_budget("pyramiddrop_for_average.total", total)
    if layers is None:
        layers = scale_layers(AVERAGE_LAYERS, num_layers)
    layers = _check_layers("pyramiddrop_for_average", layers, num_layers)
    bounds = [0, *layers, num_layers]
    lens = [b1 - b0 for b0, b1 in itertools.pairwise(bounds)]

    def avg(lam: float) -> float:
        return total * sum(n * lam ** s for s, n in enumerate(lens)) / num_layers

    # lowest average of the rule: the lambda whose last count int(total * lambda^m) is still one token
    lo_avg = avg(total ** (-1.0 / len(layers)))
    if not lo_avg <= budget < total:
        hint = ("move the first cut earlier" if layers[0] > 1 else "the first cut is already after layer 1, so "
                "a deeper decoder is needed (LLaVA-1.5 has 32 layers)")
        raise BudgetError(f"pyramiddrop_for_average: budget={budget} is not reachable with cuts after {list(layers)} "
                          f"of {num_layers} layers: the rule's averages lie in [{lo_avg:.1f}, {total}) (the first "
                          f"{layers[0]} layer(s) always see all {total} tokens, {total * layers[0] / num_layers:g} "
                          f"on average, and every later stage keeps at least one token); {hint}")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if avg(mid) < budget else (lo, mid)
    lam = 0.5 * (lo + hi)
    ratios = tuple(lam ** s for s in range(1, len(layers) + 1))
    return pyramiddrop(layers, ratios, total)


pyramiddrop.for_average = pyramiddrop_for_average  # type: ignore[attr-defined]
register("pyramiddrop", lambda b, c: pyramiddrop_for_average(b, num_layers=c.text.num_hidden_layers,
                                                             total=visual_tokens(c)))


@register("pyramiddrop_final")
def _pyramiddrop_final(budget: int, cfg) -> Compose:
    """``budget`` = visual tokens left after the last cut (``registry.final_keeps``), average-rule layers."""
    from jaxprune.reducers.adsc import drop_noops

    layers = scale_layers(AVERAGE_LAYERS, cfg.text.num_hidden_layers)
    layers, keeps = drop_noops(layers, final_keeps(budget, visual_tokens(cfg), len(layers)), visual_tokens(cfg))
    return compose(*(PyramidDropCut(layer=l, keep=k) for l, k in zip(layers, keeps)))
