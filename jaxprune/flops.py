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


def cut_cost(cfg: LlavaConfig, r, t: int, v: int) -> float:
    """Selection FLOPs of the in-LLM cut ``r`` on a ``t``-token sequence with ``v`` visual tokens (see the
    module docstring): next-layer key projection of every token, query projection and score logits of the
    scored rows. RMSNorm, RoPE and softmax (O(t H)) are left out, as in :func:`llm_layer`."""
    if not getattr(r, "needs_next_qk", False):
        return 0.0
    c = cfg.text
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    rows = {"all": t, "last": 1, "visual": v}[r.next_q_rows]
    return 2 * t * c.hidden_size * kv + 2 * rows * c.hidden_size * q + 2 * rows * t * q


def fastv_layer(cfg: LlavaConfig, n: int) -> float:
    """FastV's per-layer count on an ``n``-token sequence, ``4 n d^2 + 2 n^2 d + 2 n d m`` multiply-adds (paper
    section 4.2; the per-layer term of ``llm_fastv_formula``)."""
    d, m = cfg.text.hidden_size, cfg.text.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def _tower(cfg: LlavaConfig, specs) -> tuple[float, int]:
    """FLOPs of one image / crop through the tower (embedding + layers up to the feature layer, fewer tokens
    after each vision-stage cut of ``specs``) and its token count at the feature layer (CLS included)."""
    v = cfg.vision
    L = cfg.feature_layer_index
    cost = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
    s, done = 1 + v.num_patches, 0
    for r in specs:
        if r.stage != "vision":
            continue
        cut = L if r.vision_layer is None else r.vision_layer
        cost += sum(_clip_layer(cfg, s) for _ in range(done, cut))
        done, s = cut, 1 + r.output_tokens(v.num_patches)
    cost += sum(_clip_layer(cfg, s) for _ in range(done, L))
    return cost, s


def prefill_cost(cfg: LlavaConfig, reducer=None, text_tokens: int = 75, images: int = 1, batch: int = 1,
                 image_tokens: int | None = None, crops: int | None = None) -> PrefillCost:
    """FLOPs of one prefill of ``batch`` rows, each ``text_tokens`` text tokens plus ``images`` images.

    LLaVA-NeXT (``cfg.model_type == "llava_next"``): ``crops`` real crops per image (default: the pinpoints'
    maximum) and ``image_tokens`` placeholders per image (its HF count; default: the maximum). The unreduced
    model runs the image's real tokens; with a reducer the decoder runs the static span of the family's layout
    (:mod:`jaxprune.families.llava_next`: ``S`` slots per image, unused ones masked but computed).
    Video-LLaVA: ``images`` counts videos of ``cfg.num_frames`` frames (the layout budgets count against).
    LLaVA-OneVision: one single image (anyres) of ``crops`` real crops (1 base + tiles; default: the pinpoints'
    maximum) and ``image_tokens`` placeholders (its HF count; default: the config's maximum), counted on the static
    layout a batch of such images runs (:mod:`jaxprune.families.onevision_spans`): the unreduced model and
    projector-stage reducers run the tower on ``bucket(crops)`` crops (the batch's crop bucket, zero crops
    included), vision-stage reducers on the bucketed crop slots; the unreduced decoder runs the real placeholders,
    a reduced one the span's static slots (sized on ``image_tokens``)."""
    from jaxprune import families
    from jaxprune.engine.cuts import check_llm_reducers
    from jaxprune.engine.plan import split_reducer

    reducers, opts = split_reducer(reducer) if reducer is not None else ((), None)
    v = cfg.vision
    full = cfg.vision_feature_select_strategy == "full"
    st = families.get(cfg.model_type).static(cfg, reducers, opts, images, None)
    if cfg.model_type == "llava_next":
        n = st.C if crops is None else int(crops)
        chain = ()
        if st.mode == "vision":
            chain = dict(st.variants).get(n if opts is None or opts.crop_split == "real" else 0)
            if chain is None:
                chain = st.variants[-1][1]
        vision_one, s = _tower(cfg, chain)
        vision = n * vision_one
        projector = n * 2 * (s - 1) * (v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
        if reducers:
            span, pool = st.S, st.V
        else:
            span = pool = st.S_full if image_tokens is None else int(image_tokens)
    elif cfg.model_type == "llava_onevision":  # SigLIP: no CLS; one image of ``crops`` real crops
        from jaxprune.families.onevision_spans import bucket, image_extent, reduced_static

        P = v.num_patches
        k_max, c_max = image_extent(cfg, None)  # the config's largest image
        k_img, c_img = image_extent(cfg, None, (k_max if image_tokens is None else image_tokens,
                                                c_max if crops is None else crops))
        if reducers:
            st = reduced_static(cfg, reducers, opts, images, None, image=(k_img, c_img))
        n = st.crops if (reducers and st.vision) else bucket(c_img)
        cost = 2 * P * v.patch_size ** 2 * v.num_channels * v.hidden_size
        s, done, L = P, 0, cfg.feature_layer_index
        for r in (st.specs if reducers and st.vision else ()):  # per crop, placeholder CLS outside the tower
            cut = L if r.vision_layer is None else r.vision_layer
            cost += sum(_clip_layer(cfg, s) for _ in range(done, cut))
            done, s = cut, r.output_tokens(s) - 1  # as onevision_spans.reduced_static: d + c patches
        vision = n * (cost + sum(_clip_layer(cfg, s) for _ in range(done, L)))
        projector = n * 2 * s * (v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
        span, pool = (st.S, st.V) if reducers else (k_img, k_img)
    elif cfg.model_type == "video_llava":  # ``images`` = videos of ``cfg.num_frames`` frames (CLS kept per frame)
        F = st.frames
        vision_one, s = _tower(cfg, st.specs if st.frames_mode == "per_frame" else ())
        vision = F * vision_one
        projector = F * 2 * s * (v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
        span, pool = (st.S, st.V) if reducers else (st.S_full, st.S_full)
    else:
        vision, s = _tower(cfg, reducers)
        per_image_proj = s - (0 if full else 1)
        projector = 2 * per_image_proj * (v.hidden_size * cfg.text.hidden_size + cfg.text.hidden_size ** 2)
        span = pool = st.S if reducers else cfg.tokens_per_image
    counts = check_llm_reducers(cfg, reducers, images, pool)
    llm_cuts = [r for r in reducers if r.stage == "llm"]
    cuts = [r.layer for r in llm_cuts] + [cfg.text.num_hidden_layers]
    fixed = text_tokens + images * (span - pool)  # tokens that never leave the sequence (text, non-pool slots)
    segs, start = [], 0
    for c, stop in zip(counts, cuts):
        segs.append((stop - start, fixed + c))
        start = stop
    llm = sum(n_ * llm_layer(cfg, t) for n_, t in segs) + 2 * cfg.text.hidden_size * cfg.text.vocab_size
    fv = sum(n_ * fastv_layer(cfg, t) for n_, t in segs)
    cut = sum(cut_cost(cfg, r, fixed + c, c) for r, c in zip(llm_cuts, counts))
    return PrefillCost(vision=batch * images * vision, projector=batch * images * projector,
                       llm_swiglu=batch * llm, llm_fastv_formula=batch * fv, segments=tuple(segs),
                       visual_tokens=tuple(counts), llm_cuts=batch * cut)


def kv_cache_bytes(cfg: LlavaConfig, cost: PrefillCost, batch: int, new_tokens: int, itemsize: int = 2) -> int:
    """Bytes of the static KV caches: each segment's layers hold ``T_s + new_tokens`` slots."""
    c = cfg.text
    per_slot = 2 * batch * c.num_key_value_heads * c.head_dim * itemsize
    return sum(n * (t + new_tokens) * per_slot for n, t in cost.segments)
