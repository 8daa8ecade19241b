"""ConsensusDrop: fuse [CLS] saliency with query-aware cross-attention by rank, keep the consensus top
tokens, merge the rest into them by vision-key similarity (pre-LLM, projector stage).

Paper: "ConsensusDrop: Fusing Visual and Cross-Modal Saliency for Efficient Vision Language Models",
Parikh, Fan, Prasanna, Kannan, arXiv 2602.00946v1 (2026). Code: NOT released ("Our code will be
open-sourced"); only the abstract was available, so this is a ConsensusDrop-*like* reducer.

What the abstract specifies (all of it):
  * training-free; two saliency signals: (a) vision-encoder saliency (broad, query-agnostic) and
    (b) LLM cross-attention (query-aware, "sparse and costly"); fusing them beats either alone;
  * obstacle 1: cross-modal saliency is usually only available *inside* the LLM, too late for
    pre-LLM pruning; obstacle 2: the two signals are asymmetric, so "naive fusion underutilizes
    their complementary strengths";
  * a *consensus ranking* reconciling the two selects the kept tokens; the rest are compressed by
    "encoder-guided token merging"; it reduces TTFT and the KV cache (so it prunes before the LLM).
Everything else (score definitions, layers, heads, normalisation, fusion rule, merge rule) is
unspecified. Our choices, and why:

1. Visual saliency ``v_j = mean_h A_h[CLS, j]`` at the vision feature layer (``ctx.cls_attn``, the
   FasterVLM / VisionZip signal; the abstract's "vision encoder saliency").
2. Cross-attention ``x_j``, by ``source``:
   * ``"shallow"`` (default; the literal reading of "LLM cross-attention"): the plan runs the first
     ``shallow_layers`` (K, default 2) decoder layers on the full, unpruned sequence and hands us
     ``ctx.text_to_image``: softmax attention of the prompt's final text query rows to every
     image token at decoder layer K-1, averaged over heads and query rows (see
     ``plan._text_to_image``; the query rows are the text tokens among the last ``query_rows``
     slots of the prompt, default 32). The pruned prefill then runs from layer 0 on the reduced
     sequence; the shallow pass is the extra cost the paper calls "costly".
   * ``"proxy"`` (runs no decoder layer; AdaFV-style, arXiv 2501.09532, ``JiayiV/AdaV``):
     ``S_tj = cos(e_t, f_j)`` between the LLM *input* embeddings ``e_t`` of the prompt's text tokens
     (``ctx.text_embeds``) and the projected visual tokens ``f_j`` (``ctx.features``);
     ``a_tj = softmax_j(S_tj / 0.01)`` over the valid image tokens (AdaV's temperature 0.01);
     ``x_j = mean_t a_tj`` over the query set ``Q``. We average over ``t`` (AdaV takes the max)
     so the proxy has the shape of the shallow source: a per-row attention distribution averaged
     over query rows. ``Q`` is chosen exactly as the shallow source chooses its query rows: the
     valid text tokens (``ctx.text_valid``) among the last ``query_rows`` slots ending at the
     prompt's last text token; for a LLaVA-1.5 prompt whose question is shorter than that this is
     the text after the image (the question), not the query-agnostic system prompt.
     ``shallow_layers`` must be 0 (``None`` resolves to 2 for "shallow" and 0 for "proxy").
     The proxy is evaluated in the log domain (``log x_j`` via log-softmax + logsumexp over ``Q``):
     at temperature 0.01 most ``a_tj`` underflow float32 to exactly 0, which would tie their ranks
     (and break the ties by index); the rank fusions read ``log x_j`` (same order, no underflow),
     min-max reads ``x_j``.
3. Consensus by *rank* fusion (``fusion``). Ranks are over the valid tokens of an image, 1 = most
   salient, ties to the lower index (``r^V`` from ``v``, ``r^X`` from ``x``). Cross-attention is
   peaky and CLS attention flatter; ranks are invariant to each signal's scale and shape, which is
   how we read "asymmetric ... naive fusion underutilizes":
   * ``"rrf"`` (default): reciprocal-rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009) with their
     constant ``k = 60``: ``s_j = 1/(60 + r^V_j) + 1/(60 + r^X_j)``. Rewards tokens ranked high by
     *either* signal (top-heavy), while a token both signals rank well wins.
   * ``"borda"``: Borda count ``s_j = (n - r^V_j) + (n - r^X_j)``, ``n`` = valid tokens (= minus the
     average rank); linear in rank, rewards agreement rather than one strong vote.
   * ``"minmax"``: score-level fusion ``s_j = v̂_j + x̂_j`` with ``ŝ = (s - min) / (max - min)`` over
     the valid tokens (0 where max == min) -- the "naive fusion" baseline the paper argues against.
   Fused scores are float32 (RRF, min-max) or exact integers (Borda); the top ``budget`` are kept in
   raster order (sorted indices), ties to the lower index (``select_topk``).
4. Encoder-guided merging (``merge=True``): every valid dropped token is assigned to the kept valid
   token whose CLIP key at the feature layer, averaged over heads (``ctx.keys.mean(heads)``, the
   VisionZip merge metric), has the highest cosine similarity (ties to the lower slot); each kept
   token becomes the *unweighted mean* of itself and its assigned tokens,
   ``(f_i + sum_{j->i} f_j) / (1 + |{j->i}|)`` (ToMe's size-weighted average with unit sizes). We
   chose the plain mean because (i) it keeps merged tokens on the scale of real projected tokens
   (VisionZip's ``target + mean`` doubles it), and (ii) saliency weights would let the kept token
   (by construction the most salient of its group) swamp what is merged in. The merge acts on the
   projected features (what the LLM reads); the projector is per-token, so merging before it
   would need a re-projection the context does not carry. ``Reduced.merged_into`` lists, for each
   dropped token (the complement of ``index``, ascending), the kept slot it went into (-1: invalid).

Positions: renumbered (pre-LLM; the LLM sees a shorter sequence). Budget: ``budget`` visual tokens per
image; slots a budget cannot fill (fewer valid tokens) come back invalid. Static shapes throughout:
ranks come from one ``lax.sort`` on (invalid, -score, index) keys, no host callbacks.

On LLaVA-OneVision (SigLIP, no [CLS]) the visual saliency is the CLS-free surrogate in ``ctx.cls_attn``
(attention each patch receives, averaged over its crop's queries; :mod:`jaxprune.families.onevision_spans`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.reducers._core import (
    assign_argmax,
    complement_indices,
    cosine_similarity,
    gather,
    merge_into,
    select_topk,
)
from jaxprune.reducers.base import ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register

SOURCES = ("shallow", "proxy")
FUSIONS = ("rrf", "borda", "minmax")
RRF_K = 60.0            # Cormack et al. (2009)
PROXY_TEMPERATURE = 0.01  # AdaV's softmax(100 * cos)
DEFAULT_SHALLOW_LAYERS = 2


# ---------------------------------------------------------------------------------------------------
# Pure array functions (jittable, static shapes).
def descending_ranks(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """1-based ranks ``[B, N]`` int32 of ``scores [B, N]`` among the ``valid`` tokens: 1 = highest, ties to
    the lower index, NaN counts as ``-inf``. Invalid tokens get the ranks after every valid one."""
    b, n = scores.shape
    s = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    # full lexicographic key (invalid last, then higher score, then lower index): unique, so the
    # result does not depend on sort stability
    _, _, order = lax.sort(((~valid).astype(jnp.int32), -s, iota), dimension=1, num_keys=3)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    return jnp.zeros((b, n), jnp.int32).at[rows, order].set(iota + 1)


def _minmax(s: jax.Array, valid: jax.Array) -> jax.Array:
    s = s.astype(jnp.float32)
    lo = jnp.min(jnp.where(valid, s, jnp.inf), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(valid, s, -jnp.inf), axis=1, keepdims=True)
    span = hi - lo
    ok = jnp.isfinite(span) & (span > 0)
    return jnp.where(ok & valid, (s - jnp.where(ok, lo, 0.0)) / jnp.where(ok, span, 1.0), 0.0)


def fuse(visual: jax.Array, cross: jax.Array, valid: jax.Array, fusion: str = "rrf") -> jax.Array:
    """Consensus score ``[B, N]`` float32 (higher = keep) of two saliency signals ``[B, N]``."""
    if fusion == "minmax":
        return _minmax(visual, valid) + _minmax(cross, valid)
    rv, rx = descending_ranks(visual, valid), descending_ranks(cross, valid)
    if fusion == "rrf":
        return 1.0 / (RRF_K + rv.astype(jnp.float32)) + 1.0 / (RRF_K + rx.astype(jnp.float32))
    if fusion == "borda":
        n = jnp.sum(valid, axis=1, keepdims=True, dtype=jnp.int32)
        return ((n - rv) + (n - rx)).astype(jnp.float32)
    raise ValueError(f"fusion={fusion!r} unknown; expected one of {FUSIONS}")


def query_window(text_valid: jax.Array, query_rows: int) -> jax.Array:
    """``[B, T]`` bool: the valid text tokens among the last ``query_rows`` slots ending at each row's last
    valid text token (the query rows of the shallow source)."""
    t = text_valid.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    last = jnp.max(jnp.where(text_valid, pos, -1), axis=1, keepdims=True)  # [B, 1]
    return text_valid & (pos > last - query_rows)


def _logsumexp(x: jax.Array, axis: int) -> jax.Array:
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))  # all -inf -> -inf


def proxy_text_to_image(text_embeds: jax.Array, text_valid: jax.Array, features: jax.Array, valid: jax.Array,
                        query_rows: int = 32, temperature: float = PROXY_TEMPERATURE, log: bool = False) -> jax.Array:
    """No-LLM cross-attention proxy ``[B, P]`` float32: ``mean_{t in Q} softmax_j(cos(e_t, f_j) / temperature)``
    with the softmax over the valid image tokens and ``Q = query_window(text_valid, query_rows)``.

    Computed in the log domain (``log=True`` returns ``log x_j``, ``-inf`` for invalid tokens or an
    empty ``Q``): with temperature 0.01 most probabilities underflow float32 to exactly 0 (``exp(-120)``),
    which would turn their ranks into index order; the log keeps the exact order."""
    q = query_window(text_valid, query_rows)  # [B, T]
    z = cosine_similarity(text_embeds, features) / temperature  # [B, T, P] f32
    z = jnp.where(valid[:, None, :], z, -jnp.inf)
    logp = z - _logsumexp(z, axis=2)[..., None]  # log softmax over image tokens
    logp = jnp.where(q[..., None] & valid[:, None, :], logp, -jnp.inf)  # NaN-free on empty rows
    n = jnp.sum(q, axis=1, dtype=jnp.float32)[:, None]
    out = _logsumexp(logp, axis=1) - jnp.log(jnp.maximum(n, 1.0))  # [B, P] log of the mean over Q
    return out if log else jnp.exp(out)


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConsensusDrop(ReducerBase):
    """Rank-fused CLS + text->image saliency, top-``budget`` kept, the rest merged by CLIP-key similarity."""

    budget: int
    source: str = "shallow"
    shallow_layers: int | None = None  # type: ignore[assignment]  # None -> 2 (shallow) / 0 (proxy)
    fusion: str = "rrf"
    merge: bool = True
    query_rows: int = 32
    stage: ClassVar[str] = "projector"

    def __post_init__(self):
        check_budget("ConsensusDrop.budget", self.budget)
        if self.source not in SOURCES:
            raise ValueError(f"ConsensusDrop: source={self.source!r} unknown; expected one of {SOURCES}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"ConsensusDrop: fusion={self.fusion!r} unknown; expected one of {FUSIONS}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"ConsensusDrop: merge must be a bool, got {self.merge!r}")
        if isinstance(self.query_rows, bool) or not isinstance(self.query_rows, int) or self.query_rows < 1:
            raise ValueError(f"ConsensusDrop: query_rows must be a Python int >= 1, got {self.query_rows!r}")
        k = self.shallow_layers
        if k is None:
            k = DEFAULT_SHALLOW_LAYERS if self.source == "shallow" else 0
            object.__setattr__(self, "shallow_layers", k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"ConsensusDrop: shallow_layers must be a Python int, got {k!r}")
        if self.source == "shallow" and k < 1:
            raise ValueError(f"ConsensusDrop: source='shallow' needs shallow_layers >= 1 decoder layers, got {k}")
        if self.source == "proxy" and k != 0:
            raise ValueError(f"ConsensusDrop: source='proxy' runs no decoder layer, so shallow_layers must be 0 "
                             f"(got {k}); use source='shallow' for a shallow prefill")

    # -- signals
    def cross_attention(self, ctx: ProjectorContext) -> jax.Array:
        """The query-aware signal ``[N, P]`` of ``self.source`` (for the proxy and a rank fusion: its log)."""
        if self.source == "shallow":
            if ctx.text_to_image is None:
                raise ValueError("ConsensusDrop(source='shallow') needs ctx.text_to_image: the plan computes it "
                                 "for projector reducers with shallow_layers > 0")
            return ctx.text_to_image.astype(jnp.float32)
        # rank fusions read the exact order of the log; min-max fuses the attention values themselves
        return proxy_text_to_image(ctx.text_embeds, ctx.text_valid, ctx.features, ctx.valid, self.query_rows,
                                   log=self.fusion != "minmax")

    def scores(self, ctx: ProjectorContext) -> jax.Array:
        """Consensus scores ``[N, P]`` float32 (higher = keep)."""
        visual = ctx.cls_attn.astype(jnp.float32).mean(axis=1)  # [N, P]
        return fuse(visual, self.cross_attention(ctx), ctx.valid, self.fusion)

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        p = ctx.num_tokens
        check_budget("ConsensusDrop.budget", self.budget, p)
        idx, ok = select_topk(self.scores(ctx), self.budget, ctx.valid)  # [N, k] sorted
        out = Reduced.gather(ctx.features, idx, ok)
        if not self.merge:
            return out
        rest, rest_ok = complement_indices(idx, p, ctx.valid)  # [N, P-k]
        metric = ctx.keys.astype(jnp.float32).mean(axis=2)  # [N, P, hd] head-mean CLIP keys
        assign = assign_argmax(cosine_similarity(gather(metric, rest), gather(metric, idx)), ok)  # [N, P-k]
        tokens = merge_into(out.tokens, gather(ctx.features, rest), assign, dropped_valid=rest_ok, mode="mean")
        return Reduced(tokens, out.index, ok, jnp.where(rest_ok, assign, -1).astype(jnp.int32))


def consensusdrop(budget: int, source: str = "shallow", shallow_layers: int | None = None, fusion: str = "rrf",
                  merge: bool = True, query_rows: int = 32) -> ConsensusDrop:
    """ConsensusDrop spec. ``shallow_layers`` defaults to 2 for ``source="shallow"`` and must be 0 (its
    default there) for ``source="proxy"``."""
    return ConsensusDrop(budget=budget, source=source, shallow_layers=shallow_layers, fusion=fusion, merge=merge,
                         query_rows=query_rows)


register("consensusdrop", lambda b, c: consensusdrop(b))
register("consensusdrop_proxy", lambda b, c: consensusdrop(b, source="proxy"))

__all__ = ["ConsensusDrop", "consensusdrop"]
