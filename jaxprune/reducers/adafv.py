"""AdaFV / AdaV: mix CLS saliency and text-to-image similarity with a self-adaptive budget split.

Paper: "AdaFV: Accelerating VLMs with Self-Adaptive Cross-Modality Attention Mixture" (arXiv
2501.09532; published as "AdaV: Adaptive Text-visual Redirection for Vision-Language Models",
Findings of ACL 2025). Code: JiayiV/AdaV @ 746da86701d6ad9132006beaf6e1f7bf95e5e9d9 (the only stored
version of the file; the later crawled commits, up to 73752cf, show only README versions), an overlay
on Theia-4869/FasterVLM: ``llava/model/language_model/llava_llama.py``, ``LlavaLlamaForCausalLM.generate``
branch ``method == "adav"`` and the helper ``max_sqrt_sum_with_indices``; the CLS attention comes from
``llava/model/llava_arch.py`` ``encode_images`` (``image_attentions.mean(dim=1)``).

Per image (one crop, LLaVA-1.5), with ``T = budget``:
  * ``k = floor(T / 2)``, ``L = 2k`` candidates per list, ``V = L`` output tokens (so an odd
    budget gives ``T - 1`` tokens, as the code), quota ``b = floor(L * 0.25)`` and remaining
    ``K = L - 2b``.
  * S1, visual saliency: ``c_j = mean_h A_h[CLS, j]``, the CLS row of the CLIP feature-layer
    attention (softmax over CLS + patches, CLS column dropped), ``ctx.cls_attn`` averaged over heads.
  * S2, text-to-image similarity with the *original* text embeddings: ``S[t, j] = cos(e_t, v_j)``,
    ``e_t`` the LLM input embedding of text token ``t`` (``ctx.text_embeds``), ``v_j`` the projected
    visual token (``ctx.features``); ``s_j = max_t softmax_j(100 * S[t, j])`` (softmax over the
    image tokens for each text token, then the max over text tokens).
  * Candidate lists: the top ``L`` tokens by ``s`` and the top ``L`` by ``c``, each sorted by
    decreasing score (ties: lower index first).
  * Guaranteed quota: ranks ``< b`` of each list.
  * Self-adaptive split: with ``P1``/``P2`` the prefix sums (``P[0] = 0``) of the list values from
    rank ``b`` on, ``k1 = argmax_{0 <= k1 <= K} P1[k1] * P2[K - k1]`` (raw values, no normalisation;
    first maximum, i.e. the smallest ``k1`` on ties). The code's objective is this product; it
    reports its square root.
  * Picks: T2I ranks ``< b + k1`` and CLS ranks ``< b + K - k1``; exactly ``L`` entries, the union
    of the two lists' picks, sorted by token index (raster order) and gathered.
  * Duplicates (``dedupe=False``, the default, faithful): the code concatenates the two picks
    without removing duplicates, so a token picked by both signals is fed to the LLM *twice*;
    here too it appears in two slots, both ``valid=True`` (adjacent, since the output is sorted).
    ``dedupe=True`` (a deviation, off by default): each token at most once; the ``d`` slots freed
    by duplicates are back-filled with the next-best candidates alternating between the two
    signals, T2I first: a non-picked token ``j`` has priority ``min(2 (r1_j - (b + k1)),
    2 (r2_j - (b + K - k1)) + 1)`` from its full-ranking positions ``r1``/``r2`` and the ``d``
    lowest priorities are taken; the ``L`` distinct tokens are returned in raster order.
Positions: renumbered (pre-LLM; the code rebuilds ``inputs_embeds = [prefix | V visual | text]``
and calls the unmodified ``generate``).

Deviations from the official code:
  * Text tokens: the code uses every embedded token after the image (``inputs_embeds[:, 35 +
    576:]`` -- ``"\\n"``, the question and ``" ASSISTANT:"``), with a hard-coded 35-token prefix.
    ``ProjectorContext`` does not say where the image sits, so with ``text_tokens="after_image"``
    (default) the image span is recovered from ``ctx.text_valid``: the text tokens used are the
    valid ones after the last invalid->valid transition (the end of the last image / padding run
    before text); if there is none, all valid text tokens are used. This is exactly the code's
    set for the LLaVA prompt layout (``prefix <image> text``) with left or right padding.
    ``text_tokens="all"`` uses every valid text token (system prefix included).
  * Padding: padded and image rows of the text are masked out of the max over ``t``; invalid
    visual tokens are masked out of the softmax over ``j``, score ``-inf`` in both lists (never
    picked while valid candidates remain in a list) and contribute 0 to the prefix sums; slots
    they fill come back ``valid=False``, after the valid ones. With no text token at all,
    ``s_j = 0`` for every token.
  * Per image: the code handles batch size 1 (``zip(value, value_CLS)`` over one row). For
    LLaVA-NeXT (several crops) the code's CLS indices are offset by ``+crop`` instead of
    ``+crop * 576`` (seeds.md, "Code caveats"); the projector stage here runs per image, one
    crop, which is the code's consistent LLaVA-1.5 path.
  * float32 throughout with ``Precision.HIGHEST`` (the code runs in fp16 and casts the two value
    lists to fp32 for the prefix sums); cosine norms are clamped at 1e-6 (``F.normalize``: 1e-12).
  * Ties: lower token index first in both rankings (``torch.topk`` has no defined tie order).
  * ``quota`` (the code's ``budget_thres = 0.25``) is exposed; ``0 <= quota <= 0.5``.

On LLaVA-OneVision (SigLIP, no [CLS]) its CLS list ranks by the CLS-free surrogate in ``ctx.cls_attn`` (attention
each patch receives, averaged over its crop's queries; AdaV @ 746da86 has no SigLIP path;
:mod:`jaxprune.families.onevision_spans`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax.numpy as jnp

from jaxprune.reducers._core import cosine_similarity, masked_softmax, select_topk
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register

_SCALE = 100.0  # the code's softmax temperature 0.01
_TEXT = ("after_image", "all")


def text_after_image(text_valid: jnp.ndarray) -> jnp.ndarray:
    """``[N, T]`` bool: the valid text tokens after the last invalid->valid transition (all valid
    tokens when there is none) -- the text that follows the image in ``prefix <image> text``."""
    t = text_valid.shape[1]
    if t < 2:
        return text_valid
    rise = ~text_valid[:, :-1] & text_valid[:, 1:]  # [N, T-1]: token t+1 starts a text run
    start = jnp.max(jnp.where(rise, jnp.arange(1, t)[None, :], 0), axis=1)  # [N]; 0 = no rise
    return text_valid & (jnp.arange(t)[None, :] >= start[:, None])  # [N, T]


def t2i_scores(ctx: ProjectorContext, text_tokens: str = "after_image") -> jnp.ndarray:
    """``s_j = max_t softmax_j(100 cos(e_t, v_j))`` over the chosen valid text tokens -> ``[N, P]`` f32."""
    tmask = text_after_image(ctx.text_valid) if text_tokens == "after_image" else ctx.text_valid  # [N, T]
    cos = cosine_similarity(ctx.text_embeds, ctx.features)  # [N, T, P]
    prob = masked_softmax(_SCALE * cos, ctx.valid[:, None, :], axis=-1)  # [N, T, P], softmax over tokens
    return jnp.max(jnp.where(tmask[:, :, None], prob, 0.0), axis=1)  # [N, P]; probs >= 0, so 0 = no text


def _ranking(score: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Token indices by decreasing score, ties to the lower index, invalid (and NaN) last: ``[N, P]``."""
    s = jnp.where(valid & ~jnp.isnan(score), score, -jnp.inf)
    return jnp.argsort(-s, axis=1, stable=True).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class AdaFV(ReducerBase):
    budget: int
    dedupe: bool = False
    quota: float = 0.25
    text_tokens: Literal["after_image", "all"] = "after_image"
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("AdaFV.budget", self.budget)
        if self.budget < 2:
            raise BudgetError(f"AdaFV.budget={self.budget} must be >= 2 (AdaV keeps 2*floor(budget/2) tokens)")
        if not isinstance(self.dedupe, bool):
            raise TypeError(f"AdaFV.dedupe must be a bool, got {self.dedupe!r}")
        if isinstance(self.quota, bool) or not isinstance(self.quota, (int, float)) or not 0 <= self.quota <= 0.5:
            raise ValueError(f"AdaFV.quota={self.quota!r} must be a number in [0, 0.5]")
        if self.text_tokens not in _TEXT:
            raise ValueError(f"AdaFV.text_tokens={self.text_tokens!r} unknown; expected one of {_TEXT}")

    @property
    def kept(self) -> int:
        """Visual tokens per image: ``2 * floor(budget / 2)`` (the code's ``v_token_num``, one crop)."""
        return 2 * (self.budget // 2)

    def output_tokens(self, available: int) -> int:
        if self.kept > available:
            raise BudgetError(f"AdaFV.budget={self.budget} keeps {self.kept} tokens, larger than the {available} "
                              "tokens available")
        return self.kept

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        L = self.kept
        n, p = ctx.valid.shape
        self.output_tokens(p)
        b = int(L * self.quota)  # guaranteed quota per signal
        K = L - 2 * b  # budget left for the adaptive split
        valid = ctx.valid  # [N, P]
        s1 = t2i_scores(ctx, self.text_tokens)  # [N, P] T2I similarity
        s2 = ctx.cls_attn.astype(jnp.float32).mean(axis=1)  # [N, P] CLS saliency
        o1, o2 = _ranking(s1, valid), _ranking(s2, valid)  # [N, P] full rankings
        l1, l2 = o1[:, :L], o2[:, :L]  # [N, L] candidate lists
        v1 = jnp.where(jnp.take_along_axis(valid, l1, 1), jnp.take_along_axis(s1, l1, 1), 0.0)  # [N, L]
        v2 = jnp.where(jnp.take_along_axis(valid, l2, 1), jnp.take_along_axis(s2, l2, 1), 0.0)  # [N, L]
        zero = jnp.zeros((n, 1), jnp.float32)
        c1 = jnp.concatenate([zero, jnp.cumsum(v1[:, b:], axis=1)], axis=1)  # [N, L-b+1] prefix sums
        c2 = jnp.concatenate([zero, jnp.cumsum(v2[:, b:], axis=1)], axis=1)  # [N, L-b+1]
        k1s = jnp.arange(K + 1)  # candidate k1; k2 = K - k1 (both <= L - b)
        obj = c1[:, k1s] * c2[:, K - k1s]  # [N, K+1]
        k1 = jnp.argmax(obj, axis=1).astype(jnp.int32)[:, None]  # [N, 1] first maximum
        n1, n2 = b + k1, b + K - k1  # [N, 1] picks per list (n1 + n2 = L)
        if not self.dedupe:
            cand = jnp.concatenate([l1, l2], axis=1)  # [N, 2L]
            rank = jnp.arange(L)[None, :]
            chosen = jnp.concatenate([rank < n1, rank < n2], axis=1)  # [N, 2L]; exactly L True
            ok = jnp.take_along_axis(valid, cand, 1)  # [N, 2L]
            key = jnp.where(chosen, jnp.where(ok, cand, p + cand), 2 * p + cand)  # valid, fillers, rest
            key = jnp.sort(key, axis=1)[:, :L]  # [N, L] the L picks, duplicates kept, raster order
            idx = jnp.where(key >= p, key - p, key)
            return Reduced.gather(ctx.features, idx, key < p)  # [N, L, H]
        rows = jnp.arange(n)[:, None]
        iota = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
        r1 = jnp.zeros((n, p), jnp.int32).at[rows, o1].set(iota)  # [N, P] rank of each token
        r2 = jnp.zeros((n, p), jnp.int32).at[rows, o2].set(iota)  # [N, P]
        picked = (r1 < n1) | (r2 < n2)  # [N, P] union of the picks (<= L tokens)
        prio = jnp.minimum(2 * (r1 - n1), 2 * (r2 - n2) + 1)  # [N, P] back-fill order, >= 0 off the picks
        score = jnp.where(picked, 1.0, -prio.astype(jnp.float32))  # exact in f32 (|prio| < 2^24)
        idx, ok = select_topk(score, L, valid)  # [N, L] distinct, raster order, valid first
        return Reduced.gather(ctx.features, idx, ok)  # [N, L, H]


def adafv(budget: int, dedupe: bool = False, quota: float = 0.25,
          text_tokens: Literal["after_image", "all"] = "after_image") -> AdaFV:
    """AdaV (self-adaptive mix of CLS saliency and text-image similarity), ``2*floor(budget/2)`` tokens."""
    return AdaFV(budget=budget, dedupe=dedupe, quota=quota, text_tokens=text_tokens)


register("adafv", lambda b, c: adafv(b))

__all__ = ["AdaFV", "adafv"]
