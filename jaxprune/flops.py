"""Analytic prefill FLOPs and KV-cache bytes for a model + reducer spec (1 multiply-add = 2 FLOPs).

Two LLM counts, labelled:

* ``llm_swiglu``: what the decoder really computes: q/k/v/o projections with GQA widths, full
  ``T x T`` score and value matmuls (XLA computes the whole causal square), a 3-matrix SwiGLU MLP,
  and the LM head for the last token only.
* ``llm_fastv_formula``: FastV's ``L * (4 n d^2 + 2 n^2 d + 2 n d m)`` (paper section 4.2), the
  figure most pruning papers quote (it counts multiply-adds, ignores GQA, and treats the gated MLP as
  two matrices).

The vision tower (layers up to the feature layer, with fewer tokens after an in-tower cut) and the
projector are counted separately, so "vision included" speedups are honest.

``llm_cuts`` is the selection work of in-LLM cuts that the decoder count does not include: for methods
that score with the NEXT layer's attention (``needs_next_qk``: PyramidDrop, VisionDrop stage B), layer
K's RMSNorm + key projection of every token, its query projection for the scored rows
(``next_q_rows``: 1 for PyramidDrop, the V visual tokens for VisionDrop) and the score logits
``rows x T`` (the layer after the cut then projects the kept tokens again, as the official codes do).
Selections on states the decoder already computed -- FastV's one score row from layer K-1's q/k, DART's
key norms and ``P x V`` cosines, ADSC's fixed strides -- are below 0.1% of a layer and not counted.
"""

from __future__ import annotations

import dataclasses

from jaxprune.config import LlavaConfig


@dataclasses.dataclass(frozen=True)
class PrefillCost:
    vision: float
    projector: float
    llm_swiglu: float
    llm_fastv_formula: float
    segments: tuple[tuple[int, int], ...]  # (num_layers, sequence length) per decoder segment
    visual_tokens: tuple[int, ...]         # visual tokens per row in each segment
    llm_cuts: float = 0.0                  # selection work at in-LLM cuts (next-layer q/k, score rows)

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm_swiglu + self.llm_cuts

    @property
    def average_visual_tokens(self) -> float:
        n = sum(s[0] for s in self.segments)
        return sum(v * s[0] for v, s in zip(self.visual_tokens, self.segments)) / n


def _clip_layer(cfg: LlavaConfig, s: int) -> float:
    d, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    return 2 * s * 4 * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * i


def llm_layer(cfg: LlavaConfig, t: int) -> float:
    """FLOPs of one decoder layer on a ``t``-token sequence: q/k/v/o projections (GQA widths), the full
    ``t x t`` score and value matmuls, and the SwiGLU MLP (the per-layer term of ``llm_swiglu``)."""
    c = cfg.text
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    proj = 2 * t * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size)
    attn = 2 * 2 * t * t * q
    mlp = 2 * 3 * t * c.hidden_size * c.intermediate_size
    return proj + attn + mlp


def _cut_cost(cfg: LlavaConfig, r, t: int, v: int) -> float:
    """Selection FLOPs of the in-LLM cut ``r`` on a ``t``-token sequence with ``v`` visual tokens (see the
    module docstring): next-layer key projection of every token, query projection and score logits of the
    scored rows. RMSNorm, RoPE and softmax (O(t H)) are left out, as in :func:`llm_layer`."""
    if not getattr(r, "needs_next_qk", False):
        return 0.0
    c = cfg.text
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    rows = {"all": t, "last": 1, "visual": v}[r.next_q_rows]
    return 2 * t * c.hidden_size * kv + 2 * rows * c.hidden_size * q + 2 * rows * t * q


def _fastv_layer(cfg: LlavaConfig, n: int) -> float:
    d, m = cfg.text.hidden_size, cfg.text.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_cost(cfg: LlavaConfig, reducer=None, text_tokens: int = 75, images: int = 1, batch: int = 1
                 ) -> PrefillCost:
    """FLOPs of one prefill of ``batch`` rows, each ``text_tokens`` text tokens plus ``images`` images."""
    from jaxprune.engine.cuts import check_llm_reducers
    from jaxprune.families.llava import visual_budget
    from jaxprune.reducers.compose import as_tuple

    reducers = () if reducer is None else as_tuple(reducer)
    v = cfg.vision
    L = cfg.feature_layer_index
    # vision tower: embedding + layers, with the token count after each vision-stage cut
    vision = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
    s, done = 1 + v.num_patches, 0
    full = cfg.vision_feature_select_strategy == "full"
    for r in reducers:
        if r.stage != "vision":
            continue
        cut = L if r.vision_layer is None else r.vision_layer
        vision += sum(_clip_layer(cfg, s) for _ in range(done, cut))
        done, s = cut, 1 + r.output_tokens(v.num_patches)
    vision += sum(_clip_layer(cfg, s) for _ in range(done, L))
    per_image_proj = s - (0 if full else 1)
    projector = 2 * per_image_proj * (v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
    k = visual_budget(cfg, reducers) if reducers else cfg.tokens_per_image
    counts = check_llm_reducers(cfg, reducers, images, k)
    llm_cuts = [r for r in reducers if r.stage == "llm"]
    cuts = [r.layer for r in llm_cuts] + [cfg.text.num_hidden_layers]
    segs, start = [], 0
    for c, stop in zip(counts, cuts):
        segs.append((stop - start, text_tokens + c))
        start = stop
    llm = sum(n * llm_layer(cfg, t) for n, t in segs) + 2 * cfg.text.hidden_size * cfg.text.vocab_size
    fv = sum(n * _fastv_layer(cfg, t) for n, t in segs)
    cut = sum(_cut_cost(cfg, r, text_tokens + c, c) for r, c in zip(llm_cuts, counts))
    return PrefillCost(vision=batch * images * vision, projector=batch * images * projector,
                       llm_swiglu=batch * llm, llm_fastv_formula=batch * fv, segments=tuple(segs),
                       visual_tokens=tuple(counts), llm_cuts=batch * cut)


def kv_cache_bytes(cfg: LlavaConfig, cost: PrefillCost, batch: int, new_tokens: int, itemsize: int = 2) -> int:
    """Bytes of the static KV caches: each segment's layers hold ``T_s + new_tokens`` slots."""
    c = cfg.text
    per_slot = 2 * batch * c.num_key_value_heads * c.head_dim * itemsize
    return sum(n * (t + new_tokens) * per_slot for n, t in cost.segments)
