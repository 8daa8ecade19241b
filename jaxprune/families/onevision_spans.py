"""LLaVA-OneVision with reducers: one visual **span** per image / video, static shapes, the CLS-free saliency.

A span is exactly what HF hands the LLM for one input (:mod:`jaxprune.models.onevision_pack`): a single image's
``P`` base tokens + its unpadded, capped tile grid with newlines; an image of a multi-image row, ``P + 1``; a video,
``F * ceil(p/2)^2 + 1``. Every span has ``S_full`` static slots, the unused ones invalid. A batch with a reducer
holds one kind of span (single images, multi-image rows or videos) and the same number per row.

**Span sizes** (static, sized on the batch): multi-image: ``P + 1``; video: its token count; single images: the
first value of the :func:`ladder` over the :func:`bucket` series (1, 2, 3, 4, 6, 8, 12, ... 2048, 3072, 4096, 6144,
8192, ...: at most 1.5x) that is ``>=`` the longest real span among the batch's images, capped at the config's
maximum :attr:`~jaxprune.config.LlavaConfig.max_image_tokens` -- a 480x640 photo (5 crops, 2929 tokens) gets 3072
slots instead of the released pinpoints' 8829, so reducers that run LLM layers (or a shallow pass) on the whole span
before their cut run about the real length, never more than 1.5x it. The sizes a config can produce are the ladder
values between one crop's ``P`` and the maximum (9 on the released ``anyres_max_9`` geometry), each compiled once.
When the chain's budgets do not fit a size (``fastervlm(4000)`` on a 2929-token image: 4000 > 3072 slots), the next
ladder value is taken (4096), up to the maximum: a budget valid for the config stays valid on every batch, and one
larger than the image keeps every real token, as before.

**Signals** a projector-stage reducer reads are gathered through the same taps as the features, so each span slot
carries the signals of the patches it is made of (a bilinear mix of them where HF resizes / pools):

* ``cls_attn`` -- SigLIP has no [CLS]. Its surrogate here is the **attention each patch receives**, averaged over
  all query patches of its own crop / frame at the feature layer, per head (:func:`jaxprune.models.tower
  .received_attention`; a row sums to 1 like a CLS row). None of the CLS-reading methods' official codes has a
  SigLIP path in the stored snapshots (FasterVLM, VisionZip @ 3151f6d, AdaV @ 746da86; ConsensusDrop has no
  code): the choice is ours, the standard CLS-free attention saliency. FasterVLM, AdaFV, PruMerge+ and
  ConsensusDrop's visual saliency read it through ``ctx.cls_attn`` unchanged;
* ``keys`` / ``vision_hidden`` -- the SigLIP keys / hidden states at the feature layer;
* newline slots: feature ``image_newline``, zero saliency / keys / hidden (never ranked above a patch by CLS-style
  scores; as on LLaVA-NeXT with ``newlines="prune"``, they are ordinary candidates that count against the budget).

Budgets count a span's tokens (newlines included): ``fastervlm(64)`` keeps 64 tokens per image / video.
Vision-stage reducers (VisionZip, VisionDrop stage A) split the budget over segments with the spec's own rule
(``spec.per_segment(n)``) and run inside the tower on every crop slot / frame. ``n``: 1 for a multi-image row's
image, ``F`` for a video, and for single images the batch's **crop slots** = the :func:`ladder` value ``>=`` the
largest real crop count among its images (1 base + tiles), capped at the pinpoints' maximum ``1 + max(gh * gw)``.
So an image whose crop count equals its slot count gets exactly ``n * (budget // n)`` tokens (``budget`` when
``n`` divides it), one with fewer crops ``crops * (budget // n)``; a 5-crop 480x640 photo on the released
pinpoints gets 6 slots (5 real) and ``5 * (budget // 6)`` tokens. Why not a per-config count: the official
VisionZip / FasterVLM LLaVA-NeXT codes apply one static per-crop count to every crop (their budget is a maximum;
jaxprune's NeXT ``crop_split="fixed"``), and jaxprune's first OneVision layout did the same over the pinpoints'
maximum -- 37 crop slots on the released geometry, so the tower ran 37 crops for a 5-crop image and
``visionzip:732`` delivered 95 tokens: the budget was not honoured. Splitting over each image's own crop count
(NeXT's ``crop_split="real"``) would make the per-crop count vary per image; the batch's bucketed count keeps it
static per crop bucket (a bounded set of layouts: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ..., the maximum) and honours
the budget up to the bucket's rounding. Each crop slot runs with a
**placeholder CLS**: slot 0 of their context is a zero token whose saliency row is the surrogate above; it never
enters the tower and is dropped with its copy after the reduction, the spec's CLS slot going to one more dominant
patch (``dominant + 1``), so a crop keeps ``dominant + contextual`` patches. The span is then the crops' / frames'
reduced tokens in crop order (base, tiles row-major; frames in order), with no unpadding, resizing, pooling or
newline except a video's final newline (the official VisionZip / FasterVLM NeXT codes also pack reduced crops
without unpadding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.families.base import TextToImage
from jaxprune.inputs import InputError
from jaxprune.models.onevision_pack import NEWLINE, pooled_side
from jaxprune.models.tower import clip_segment, received_attention
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, VisionContext


def bucket(n: int) -> int:
    """The static size ``n`` is padded to: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1.5x ``n``)."""
    b = 1
    while True:
        for c in (b, 3 * b // 2) if b >= 2 else (b,):
            if c >= n:
                return c
        b *= 2


def ladder(n: int, cap: int) -> tuple[int, ...]:
    """The static sizes ``>= n`` a batch-sized span / crop count may take, smallest first: the :func:`bucket` values
    from ``bucket(n)`` on, each capped at ``cap``, ending at ``cap`` (``ladder(2929, 8829) = (3072, 4096, 6144, 8192,
    8829)``; ``n >= cap``: ``(cap,)``)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"ladder: n must be a positive int, got {n!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise ValueError(f"ladder: cap must be a positive int, got {cap!r}")
    out, c = [], min(bucket(int(n)), int(cap))
    while True:
        out.append(c)
        if c >= cap:
            return tuple(out)
        c = min(bucket(c + 1), int(cap))


@dataclasses.dataclass(frozen=True)
class OnevisionStatic:
    """Static (hashable) layout of one OneVision run: unreduced (``ipr = 0``, HF's layout) or one span per input."""

    Tc: int                # crops + frames through the tower (bucketed)
    K: int                 # unreduced: placeholder taps (bucketed)
    P: int                 # patches per crop
    ipr: int = 0           # spans per row (0: unreduced)
    S: int = 0             # slots per span reaching the LLM
    S_h: int = 0           # slots per span in the canonical rows
    V: int = 0             # in-LLM pool slots per span
    S_full: int = 0        # slots of an unreduced span
    kind: str = ""         # "image" | "multi" | "video"
    specs: tuple = ()      # the pre-LLM specs as run (vision-stage: per crop, dominant + 1)
    vision: bool = False   # vision-stage chain (per crop) instead of projector-stage (per span)
    crops: int = 0         # vision mode: crop slots per span (bucketed)

    @property
    def dense(self) -> bool:  # unreduced: the first entries of the tap table are the placeholders, in order
        return True


def _kind(visual) -> tuple[str, int]:
    """``(kind, frames)`` of a batch for reducers; one kind only."""
    if visual is None:
        return "image", 0
    lay = visual.layout
    if lay.n_images and lay.n_videos:
        raise InputError("reducers on llava_onevision need a batch of one visual kind (only images or only videos); "
                         "this batch has both: run images and videos in separate calls")
    if lay.n_videos:
        return "video", lay.frames
    if lay.multi.any() and not lay.multi.all():
        raise InputError("reducers on llava_onevision need every row alike: rows with one image (anyres) and rows "
                         "with several images (base crops) differ in span layout; run them in separate calls")
    return ("multi" if lay.multi.any() else "image"), 0


def span_size(cfg, kind: str, frames: int) -> int:
    """``S_full`` of a span of ``kind`` (single images: its upper bound, the config's largest image)."""
    p = cfg.vision.grid
    if kind == "video":
        return frames * pooled_side(p) ** 2 + 1
    if kind == "multi":
        return p * p + 1
    return cfg.max_image_tokens


def image_extent(cfg, visual, image: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(longest span tokens, most crops)`` over a batch's single images, from ``visual`` (the family's
    :class:`~jaxprune.families.base.VisualInputs`), else ``image``, else the config's largest image."""
    if visual is not None and visual.layout.n_images:
        return int(np.max(visual.span_tokens[: visual.layout.n_images])), int(np.max(visual.layout.crops))
    if image is not None:
        tokens, crops = image
        for name, v in (("span tokens", tokens), ("crops", crops)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"image=(span tokens, crops): {name} must be a positive int, got {v!r}")
        return int(tokens), int(crops)
    return cfg.max_image_tokens, _max_crops(cfg)


def _vision_spec(r):
    """A vision-stage spec on a CLS-less tower: its CLS slot goes to one more dominant patch."""
    if hasattr(r, "dominant"):
        return dataclasses.replace(r, dominant=r.dominant + 1)
    return r


def _llm_fits(reducers: tuple, ipr: int, V: int) -> None:
    """The in-LLM budgets against ``ipr * V`` pool slots (:class:`BudgetError` when one does not fit)."""
    v = ipr * V
    for r in reducers:
        if r.stage == "llm":
            v = r.output_visual(v)


def reduced_static(cfg, reducers: tuple, options, ipr: int, visual, image: tuple[int, int] | None = None
                   ) -> OnevisionStatic:
    """Validate the chain against one span and fix the static layout (host side).

    Single images are sized on the batch (module docstring, "Span sizes"): ``S_full`` and the vision-stage crop
    slots are the first :func:`ladder` values ``>=`` the batch's longest real span / largest crop count
    (:func:`image_extent`) on which every budget of the chain fits. ``image = (span tokens, crops)`` stands for the
    batch when ``visual`` is None (analytic FLOPs); without either, the config's largest image."""
    if options is not None:
        raise ValueError(f"{options.stage}() does not apply to llava_onevision models (one span per image / video, "
                         "one global ranking); pass the bare reducer spec")
    kind, frames = _kind(visual)
    P = cfg.vision.num_patches
    pre = [r for r in reducers if r.stage in ("vision", "projector")]
    for r in pre:
        if getattr(r, "temporal", False):
            raise BudgetError(f"{type(r).__name__} merges across video frames: it is not implemented on "
                              "llava_onevision (its frames are pooled before the LLM)")
        if hasattr(r, "window"):
            raise BudgetError(f"{type(r).__name__} pools on the patch grid: llava_onevision spans are packed anyres "
                              "sequences (no single grid)")
    vis = [r for r in pre if r.stage == "vision"]
    proj = [r for r in pre if r.stage == "projector"]
    if vis and proj:
        raise NotImplementedError("llava_onevision: a vision-stage and a projector-stage reducer together are "
                                  "not supported (the vision stage already packs the crops for the LLM)")
    Tc = 1 if visual is None else int(visual.pixel_values.shape[0])
    if kind == "image":
        longest, most = image_extent(cfg, visual, image)
        sizes, slots = ladder(longest, cfg.max_image_tokens), ladder(most, _max_crops(cfg))
    else:
        sizes, slots = (span_size(cfg, kind, frames or 8),), ({"multi": 1, "video": frames or 8}[kind],)
    base = dict(Tc=Tc, K=0, P=P, ipr=ipr, kind=kind)
    err = None
    for n in (slots if vis else sizes):  # the smallest size on which the chain's budgets fit
        try:
            if vis:
                st = _vision_layout(vis, kind, P, n, base, S_full=sizes[0])
            else:
                st = _projector_layout(proj, n, base)
            _llm_fits(reducers, ipr, st.V)
            return st
        except BudgetError as e:
            err = e
    raise err


def _vision_layout(vis: list, kind: str, P: int, crops: int, base: dict, S_full: int) -> OnevisionStatic:
    """Vision-stage chain per crop slot / frame (``crops`` per span; the budget split with ``per_segment``)."""
    specs = tuple(_vision_spec(r.per_segment(crops)) for r in vis)
    k = P + 1
    for r in specs:
        k = 1 + r.output_tokens(k - 1)  # placeholder CLS + kept tokens (incl. the CLS copy)
    per = k - 2  # both CLS copies dropped
    if per < 1:
        raise BudgetError(f"{type(vis[0]).__name__}: no patch left per crop")
    S = crops * per + (1 if kind == "video" else 0)
    return OnevisionStatic(**base, S=S, S_h=S, V=S, S_full=S_full, specs=specs, vision=True, crops=crops)


def _projector_layout(proj: list, S_full: int, base: dict) -> OnevisionStatic:
    """Projector-stage chain over one span of ``S_full`` slots (none: the in-LLM reducers see the whole span)."""
    S = S_full
    for r in proj:
        S = r.output_tokens(S)
    need_t2i = any(getattr(r, "shallow_layers", 0) for r in proj)
    return OnevisionStatic(**base, S=S, S_h=S_full if need_t2i else S, V=S, S_full=S_full, specs=tuple(proj))


def _max_crops(cfg) -> int:
    from jaxprune.processing_anyres import check_pinpoints, max_crops

    return max_crops(check_pinpoints(cfg.image_grid_pinpoints, cfg.vision.image_size), cfg.vision.image_size)


def span_tables(lay, st: OnevisionStatic) -> dict[str, np.ndarray]:
    """Per-span device tables. Projector mode: ``span_index [N, S_full, 4]`` (rows of ``[Tc * P ; newline]``),
    ``span_weight [N, S_full, 4]``, ``span_valid [N, S_full]``. Vision mode: ``crop_of [N, crops]`` (the crop /
    frame row of each span's c-th crop, -1: none)."""
    spans = lay.spans
    N = len(spans)
    if st.vision:
        crop_of = np.full((N, st.crops), -1, np.int32)
        start = 0
        counts = list(lay.crops) + [lay.frames] * lay.n_videos
        for n, c in enumerate(counts):
            crop_of[n, :c] = start + np.arange(c)
            start += c
        return {"crop_of": crop_of}
    nl = st.Tc * st.P
    idx = np.full((N, st.S_full, 4), nl, np.int32)
    wt = np.zeros((N, st.S_full, 4), np.float32)
    ok = np.zeros((N, st.S_full), bool)
    for n, (i, w) in enumerate(spans):
        idx[n, : len(i)] = np.where(i == NEWLINE, nl, i)
        wt[n, : len(i)], ok[n, : len(i)] = w, True
    return {"span_index": idx, "span_weight": wt, "span_valid": ok}


def encode_crops(m, px: jax.Array) -> jax.Array:
    """SigLIP at ``vision_feature_layer`` ("full": every patch) + projector: ``[Tc, 3, S, S]`` -> ``[Tc, P, H]``."""
    h = m.vision.embed(px)
    h, _, _ = clip_segment(m, h, None, 0, m.cfg.feature_layer_index)
    return m.projector(h)


def gather_taps(feats: jax.Array, fill: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    """``feats [Tc, P, ...]`` + ``fill [...]`` (the newline row) -> ``[..., taps...]``: each entry the ``weight
    [..., 4]``-weighted sum of the table rows ``index [..., 4]`` (table = ``[Tc * P ; fill]``)."""
    rest = feats.shape[2:]
    table = jnp.concatenate([feats.reshape((-1,) + rest), jnp.broadcast_to(fill.astype(feats.dtype), rest)[None]])
    g = jnp.take(table, index, axis=0)  # [..., 4, *rest]
    w = weight.astype(feats.dtype).reshape(weight.shape + (1,) * len(rest))
    return jnp.sum(w * g, axis=weight.ndim - 1)


def encode_spans(m, st: OnevisionStatic, reducers: tuple, px: jax.Array, tables: dict, te, tv,
                 t2i_fn: TextToImage | None):
    """Reduced spans ``(tokens [N, S, H], valid [N, S], pool [N, S], kept [N, S])``; ``kept``: the span slot
    (projector mode) or ``crop * P + patch`` of the span's crops (vision mode; a video's newline: ``F * P``)."""
    if st.vision:
        return _encode_vision(m, st, px, tables, te, tv)
    L = m.cfg.feature_layer_index
    h, q, k = clip_segment(m, m.vision.embed(px), None, 0, L)  # [Tc, P, Dv], [Tc, P, heads, hd]
    sal = received_attention(q, k, None)  # [Tc, heads, P]
    feats = m.projector(h)
    idx, w, sv = tables["span_index"], tables["span_weight"], tables["span_valid"]
    tok = jnp.where(sv[..., None], gather_taps(feats, m.image_newline[...], idx, w), 0)  # [N, S_full, H]
    if not st.specs:
        return tok, sv, jnp.ones(sv.shape, bool), jnp.where(sv, jnp.arange(st.S_full, dtype=jnp.int32)[None], -1)
    vh = gather_taps(h, jnp.zeros(h.shape[-1:], h.dtype), idx, w)  # [N, S_full, Dv]
    cls = jnp.swapaxes(gather_taps(jnp.swapaxes(sal, 1, 2), jnp.zeros(sal.shape[1:2], sal.dtype), idx, w), 1, 2)
    kk = gather_taps(k, jnp.zeros(k.shape[2:], k.dtype), idx, w)  # [N, S_full, heads, hd]
    t2i = None
    if any(getattr(r, "shallow_layers", 0) for r in st.specs):
        layers = max(getattr(r, "shallow_layers", 0) or 0 for r in st.specs)
        rows = max(getattr(r, "query_rows", 32) for r in st.specs if getattr(r, "shallow_layers", 0))
        t2i = t2i_fn(tok, sv, layers, rows)
    src = jnp.broadcast_to(jnp.arange(st.S_full, dtype=jnp.int32), sv.shape)
    valid = sv
    for r in st.specs:
        red: Reduced = r(ProjectorContext(features=tok, valid=valid, vision_hidden=vh, cls_attn=cls, keys=kk,
                                          text_embeds=te, text_valid=tv, text_to_image=t2i, grid=(1, tok.shape[1])))
        tok, valid = red.tokens, red.valid
        src = jnp.take_along_axis(src, red.index, axis=1)
        vh = jnp.take_along_axis(vh, red.index[..., None], axis=1)
        cls = jnp.take_along_axis(cls, red.index[:, None, :], axis=2)
        kk = jnp.take_along_axis(kk, red.index[:, :, None, None], axis=1)
        if t2i is not None:
            t2i = jnp.take_along_axis(t2i, red.index, axis=1)
    return tok, valid, jnp.ones(valid.shape, bool), jnp.where(valid, src, -1)


def _encode_vision(m, st: OnevisionStatic, px, tables, te, tv):
    """Vision-stage chain per crop / frame with a placeholder CLS (module docstring), spans in crop order."""
    cfg = m.cfg
    L = cfg.feature_layer_index
    g = cfg.vision.grid
    crop_of = tables["crop_of"]  # [N, C]
    N, C = crop_of.shape
    P = st.P
    h = m.vision.embed(jnp.take(px, jnp.maximum(crop_of, 0).reshape(-1), axis=0))  # [N*C, P, Dv]
    te_c = None if te is None else jnp.repeat(te, C, axis=0)
    tv_c = None if tv is None else jnp.repeat(tv, C, axis=0)
    valid = None
    src = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], h.shape[:2])
    done = 0
    for r in st.specs:
        cut = L if r.vision_layer is None else r.vision_layer
        if not done < cut <= L:
            raise BudgetError(f"{type(r).__name__}: vision_layer={cut} must be in ({done}, {L}]")
        h, q, k = clip_segment(m, h, valid, done, cut)
        done = cut
        v = jnp.ones(h.shape[:2], bool) if valid is None else valid
        sal = received_attention(q, k, v)  # [NC, heads, S]
        zero = jnp.zeros_like(h[:, :1])
        ctx = VisionContext(hidden=jnp.concatenate([zero, h], 1),
                            cls_attn=jnp.concatenate([jnp.zeros_like(sal[:, :, :1]), sal], 2),
                            keys=jnp.concatenate([jnp.zeros_like(k[:, :1]), k], 1),
                            valid=jnp.concatenate([jnp.ones_like(v[:, :1]), v], 1),
                            text_embeds=te_c, text_valid=tv_c, grid=(g, g))
        red: Reduced = r(ctx)
        keep = red.index[:, 2:] - 1  # drop the placeholder CLS and its copy
        h = red.tokens[:, 2:]
        valid = red.valid[:, 2:] & (keep >= 0)
        src = jnp.take_along_axis(src, jnp.maximum(keep, 0), axis=1)
    if done < L:
        h, _, _ = clip_segment(m, h, valid, done, L)
    feats = m.projector(h)  # [NC, k, H]
    kper = feats.shape[1]
    ok = valid & (crop_of.reshape(-1) >= 0)[:, None]
    crop = jnp.arange(N * C, dtype=jnp.int32)[:, None] % C
    kept = jnp.where(ok, crop * P + src, -1).reshape(N, C * kper)
    tok, ok = feats.reshape(N, C * kper, -1), ok.reshape(N, C * kper)
    if st.kind == "video":
        nl = jnp.broadcast_to(m.image_newline[...].astype(tok.dtype), (N, 1, tok.shape[-1]))
        tok = jnp.concatenate([tok, nl], 1)
        ok = jnp.concatenate([ok, jnp.ones((N, 1), bool)], 1)
        kept = jnp.concatenate([kept, jnp.full((N, 1), C * P, jnp.int32)], 1)
    return tok, ok, jnp.ones(ok.shape, bool), kept
