"""The LLaVA-NeXT family (``model_type="llava_next"``): anyres inputs, per-crop CLIP, packing of (reduced) crops,
newline policy, static shapes. The engine (:mod:`jaxprune.engine`) calls :class:`LlavaNextFamily`; the unreduced
model is the ``mode="none"`` layout placed in HF's layout.

A NeXT image is ``1 + gh*gw`` crops (base + tiles, at most ``C``, 5 for llava-v1.6) of ``P`` patches each (576);
HF packs them as ``[base P] + [unpadded tile grid, row-major, image_newline after each row]`` (up to ``M`` =
2928 tokens, :mod:`jaxprune.models.anyres`). Everything here runs in one jit per (batch size, text-length
bucket, reducer spec, options): every shape depends on the config and the budgets only, so batches that mix
tall, wide and square images share one compiled program.

**Budgets** follow the papers' convention: "full" = ``C * P`` = 2880 = 5 x 576 (newlines and unpadding ignored);
640 / 320 / 160 kept = 22% / 11% / 5.6%. A pre-LLM spec's budget is the image's *whole* budget (``visionzip
.for_budget(640)``, ``fastervlm(640)``); in-LLM specs count the row's visual pool (``fastv(keep=640)``). With the
default ``newlines="prune"`` the budget is exactly the number of visual tokens that enter the LLM (newlines
included, if selected) and the static in-LLM pool is ``M`` = 2928 slots per image (the real packed count, up to
2928 incl. newlines, minus padding); with ``"keep"`` / ``"drop"`` the budget and the pool (``C * P`` = 2880 slots)
count non-newline tokens only.

**Options** (:func:`next_options`, a wrapper spec; defaults when a bare spec is given):

* ``newlines`` -- what happens to the ``image_newline`` tokens (one after each row of the tile grid):
    - ``"prune"`` (default): newline tokens are ordinary candidates that count against the budget; their CLS
      attention, CLIP keys and CLIP features are zero (they have none), their projected feature is
      ``image_newline``; in the LLM they are pool tokens like any other. This is what the official codes do:
      FastV / PyramidDrop / DivPrune select over the whole image span, newlines included; the official
      VisionZip, FasterVLM and AdaV NeXT codes keep no newline at all, and here a newline never wins a CLS
      ranking (zero attention) and is no crop token for per-crop / vision-stage reductions. Budgets are exact,
      which FLOPs / latency comparisons need.
    - ``"keep"``: outside the budget, preserving the layout cue the model was trained with. Budgets count
      non-newline tokens only; after a pre-LLM reduction the newline of every tile row that still has a kept
      (spatially placed) token is kept, at its place; with in-LLM reducers only, every newline is kept and is not
      part of the pool. Costs up to ``NL`` extra tokens (max rows: 48 for a 2x2 llava-v1.6 grid, 72 for 1x3) --
      measured on llava-v1.6 geometry: +72 at 640 (11%), +64 at 160 (40%).
    - ``"drop"``: no newline token reaches the LLM (the official VisionZip / FasterVLM / AdaV packing,
      ``mm_patch_merge_type='spatial'``); with in-LLM reducers only, the newlines are removed from the input.
* ``per_crop`` -- projector-stage reducers: ``False`` (default) = one selection over the image's packed tokens with
  the global budget (each token's CLS attention is the one of *its own* crop's CLS, its CLIP keys / features
  from its own crop); ``True`` = the reducer runs on every crop separately (``P`` tokens, grid ``(p, p)``, so
  grid reducers such as ``pool2x2`` work) with a per-crop budget -- what the official FasterVLM NeXT code does.
  Vision-stage reducers (VisionZip, VisionDrop stage A) always run per crop (each crop has its own CLS).
* ``crop_split`` -- the per-crop budget of per-crop reductions:
    - ``"real"`` (default): the image's budget split over the crops it really has, ``budget // n_crops``
      (640 over 5 crops = 128 each, over 3 crops = 213 each): every image gets (up to rounding) the budget.
    - ``"fixed"``: ``budget // C`` per real crop whatever the image (640 -> 128 per crop; a 3-crop image gets
      384). This is what the official VisionZip and FasterVLM NeXT codes do: one static per-crop count applied to
      every crop (``apply_info(dominant, contextual)`` / ``visual_token_num``), so their "640" is a maximum.
  Padded crops (``crop_valid`` False) get nothing. A (dominant, contextual) split is scaled keeping its ratio:
  ``t = (d + c) // n``, ``c' = max(1, round(c * t / (d + c)))``, ``d' = t - c'`` (540+100 = 640 over 5 crops ->
  108+20, the LLaVA-1.5 split of 128). "real" is implemented by running the (cheap) reducer once per distinct
  crop count of the pinpoints (3, 4, 5 for llava-v1.6) at that count's per-crop budget and picking per image.

**Packing of reduced tokens** (the LLM input of an image; the rest of its span is removed, as on LLaVA-1.5):

* spatial tokens (a patch of a crop) are placed in HF's packed order (base raster, then the unpadded tile grid
  row-major), newlines at the end of their rows per ``newlines``; tile patches outside the unpad box are never
  candidates (they are not in HF's packing; the official NeXT pruning codes skip unpadding and may keep them).
* vision-stage reducers: the official VisionZip NeXT order (``restore_image_features_sorted``): the base crop's
  output as the reducer returns it (CLS, dominant in raster order, contextual), then the tiles' dominant patches
  in global raster order over the tile grid (+ newlines), then the tiles' CLS tokens (crop order), then the tiles'
  contextual tokens (crop order). ``kept`` (the source packed index) of a contextual token is its target's.
* per-crop and vision-stage reductions see no newline token (they are not crop tokens): there ``"prune"``
  acts as ``"drop"``. AdaFV's text-image signal (global mode) may select newline tokens under ``"prune"``.
* AdaFV on NeXT (global): its CLS list is over every packed token ranked by the token's own crop's CLS
  attention -- correct by construction. The official AdaV code builds per-crop CLS lists and maps crop ``c``'s
  pick ``j`` to ``j + c`` instead of ``j + c * 576`` (seeds.md section 3); ``tests/test_reducers_next.py`` checks
  that our picks land on the right crop's tokens. The official per-crop CLS-list construction itself (a quota
  taken from the base crop's list first) is not reproduced: the global ranking replaces it (deviation).

Outputs: ``out.logits`` / ``out.attention_mask`` cover the reduced sequence (every image span replaced by its
``S`` slots; input padding moved to one side, see :func:`canonical_sequence`); ``out.kept [N_img, S]`` is the
packed index (into the image's HF packing, i.e. the :class:`~jaxprune.models.anyres.AnyresLayout` arrays) each
visual slot comes from (-1: a CLS token or an empty slot), ``out.kept_valid`` its validity.

In-LLM reducers see the row's visual pool: exactly ``ipr * V`` slots per row (``V`` static), padding and unused
slots invalid, so they are never selected (``llm.py`` masks them with ``visual_valid``).

Not supported (refused before tracing): a vision-stage and a projector-stage reducer together on NeXT; grid
reducers (``pool``) in global mode; ``vision_feature_select_strategy="full"`` (as the NeXT model itself).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from jaxprune.models.tower import clip_segment, cls_attention
from jaxprune.families.base import TextToImage, VisualInputs, register
from jaxprune.inputs import InputError, as_numpy, check_pixels
from jaxprune.models.anyres import AnyresGeometry, build_layout
from jaxprune.models.llava import LlavaModule
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, VisionContext

from jaxprune.reducers.options import CROP_SPLITS, NEWLINES, NextOptions, next_options, unwrap  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------
# Per-crop budgets
def per_crop_spec(r, n: int):
    """The spec ``r`` with its image budget split over ``n`` crops: the spec's own declared rule,
    :meth:`~jaxprune.reducers.base.ReducerBase.per_segment` (``crop_split`` picks ``n``)."""
    return r.per_segment(n)


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NextStatic:
    """Static (hashable) facts of one NeXT reducer run: shapes, policy, per-variant specs."""

    C: int                 # max crops
    P: int                 # patches per crop
    p: int                 # patch grid side
    M: int                 # max packed tokens (incl. newlines)
    NL: int                # max newline tokens (rows of the largest tile grid)
    ipr: int               # images per row
    newlines: str
    mode: str              # "none" | "vision" | "global" | "per_crop"
    variants: tuple        # ((n_crops or 0 = every image, specs tuple), ...) for vision / per_crop modes
    S_full: int            # slots of the unreduced image span
    S: int                 # slots of the image span the LLM receives
    S_h: int               # slots per image in the host sequence (>= S; the extra ones are cut)
    V: int                 # in-LLM pool slots per image
    need_t2i: bool         # a projector reducer needs the shallow-prefill text->image signal

    @property
    def Mnn(self) -> int:
        return self.C * self.P


def _geometry_counts(geom: AnyresGeometry) -> tuple[int, tuple[int, ...]]:
    """``(max newline rows, distinct crop counts)`` of the pinpoints."""
    S, p = geom.crop_size, geom.grid
    rows = max((h // S) * p for h, w in geom.pinpoints)
    counts = tuple(sorted({1 + (h // S) * (w // S) for h, w in geom.pinpoints}))
    return rows, counts


def visual_pool(cfg, newlines: str = "prune") -> int:
    """Static visual slots per image that in-LLM reducers see without a pre-LLM stage (the ``total`` for
    ``pyramiddrop`` / ``adsc_schedule`` on NeXT): ``M`` (2928) with ``"prune"``, ``C * P`` (2880) otherwise."""
    if newlines not in NEWLINES:
        raise ValueError(f"newlines={newlines!r} unknown; expected one of {NEWLINES}")
    geom = AnyresGeometry.from_config(cfg)
    return geom.max_tokens if newlines == "prune" else geom.max_crops * geom.tokens_per_crop


def _fold(specs, available: int) -> int:
    n = available
    for r in specs:
        n = r.output_tokens(n)
    return n


def build_static(cfg, reducers: tuple, opts: NextOptions, ipr: int) -> NextStatic:
    """Validate every budget and derive the static shapes (host side, before tracing)."""
    geom = AnyresGeometry.from_config(cfg)
    C, P, p, M = geom.max_crops, geom.tokens_per_crop, geom.grid, geom.max_tokens
    NL, counts = _geometry_counts(geom)
    Mnn = C * P
    nl = opts.newlines
    vis = [r for r in reducers if r.stage == "vision"]
    proj = [r for r in reducers if r.stage == "projector"]
    if vis and proj:
        raise NotImplementedError("llava_next: a vision-stage and a projector-stage reducer together are not "
                                  "supported (the vision stage already packs the crops for the LLM)")
    S_full = {"keep": Mnn + NL, "prune": M, "drop": Mnn}[nl]
    V_full = {"keep": Mnn, "prune": M, "drop": Mnn}[nl]
    divisors = counts if opts.crop_split == "real" else (C,)
    need_t2i = any(getattr(r, "shallow_layers", 0) for r in proj)
    if vis or (proj and opts.per_crop):
        mode = "vision" if vis else "per_crop"
        chain = vis or proj
        variants, content = [], 0
        for n in divisors:
            specs = tuple(per_crop_spec(r, n) for r in chain)
            k = _fold(specs, P)  # tokens per crop reaching the LLM (vision: CLS dropped by 'default')
            variants.append((n if opts.crop_split == "real" else 0, specs))
            content = max(content, (n if opts.crop_split == "real" else C) * k)
        variants = tuple(variants)
    elif proj:
        mode = "global"
        for r in proj:
            if hasattr(r, "window"):
                raise BudgetError(f"{type(r).__name__} pools on the patch grid: on llava_next use "
                                  "next_options(..., per_crop=True)")
        content = _fold(proj, V_full)
        variants = ()
    else:
        mode, content, variants = "none", 0, ()
    if mode == "none":
        S, V = S_full, V_full
    else:
        S = content + (NL if nl == "keep" else 0)
        V = content if nl == "keep" else S
    S_h = max(S, S_full) if (mode == "none" or need_t2i) else S
    return NextStatic(C=C, P=P, p=p, M=M, NL=NL, ipr=ipr, newlines=nl, mode=mode, variants=variants,
                      S_full=S_full, S=S, S_h=S_h, V=V, need_t2i=need_t2i)


# ---------------------------------------------------------------------------------------------------
# Host side: per-image index tables (numpy) and the canonical sequence
def layout_tables(layout, st: NextStatic) -> dict[str, np.ndarray]:
    """Per-image tables for the device (all int32 / bool numpy):

    * ``span_packed [N, S_full]``: packed index of each slot of the unreduced span (-1 = empty slot);
    * ``span_table [N, S_full]``: its row in the per-image source table ``[crops*P ; newline]``;
    * ``patch_packed [N, C*P]``: packed index of crop ``c`` patch ``j`` (-1: unpadded away / padded crop);
    * ``span_of_packed [N, M]``: span slot of each packed token (-1: not in the span);
    * ``nl_of [N, M]``: packed index of the newline ending a tile token's row (-1 otherwise);
    * ``nl_slots [N, NL]``: packed index of the image's j-th newline (-1: none);
    * ``n_crops [N]``, ``crop_valid [N, C]``.
    """
    N, M = layout.valid.shape
    C, P, NL, S = st.C, st.P, st.NL, st.S_full
    span_packed = np.full((N, S), -1, np.int32)
    patch_packed = np.full((N, C * P), -1, np.int32)
    span_of_packed = np.full((N, M), -1, np.int32)
    nl_of = np.full((N, M), -1, np.int32)
    nl_slots = np.full((N, NL), -1, np.int32)
    for i in range(N):
        real, isnl = layout.valid[i], layout.is_newline[i]
        content = np.flatnonzero(real & ~isnl)
        nlpos = np.flatnonzero(real & isnl)
        if len(content) > st.Mnn or len(nlpos) > NL:
            raise AssertionError("anyres layout exceeds the static bounds")  # pragma: no cover
        pos = content if st.newlines == "drop" else np.flatnonzero(real)
        span_packed[i, : len(pos)] = pos
        span_of_packed[i, pos] = np.arange(len(pos))
        patch_packed[i, layout.gather_index[i, content]] = content
        nl_slots[i, : len(nlpos)] = nlpos
        tile = content[layout.crop[i, content] >= 1]
        if len(tile):
            nl_of[i, tile] = nlpos[np.searchsorted(nlpos, tile)]
    table_nl = C * P
    span_table = np.where(span_packed >= 0,
                          np.take_along_axis(layout.gather_index, np.maximum(span_packed, 0), axis=1), table_nl)
    return {"span_packed": span_packed, "span_table": span_table.astype(np.int32), "patch_packed": patch_packed,
            "span_of_packed": span_of_packed, "nl_of": nl_of, "nl_slots": nl_slots,
            "is_newline": layout.is_newline.astype(bool), "n_crops": layout.num_crops.astype(np.int32),
            "crop_valid": layout.crop_valid.astype(bool)}


# ---------------------------------------------------------------------------------------------------
# Device side
def _take(x, idx, axis=1):
    """``take_along_axis`` with ``idx`` broadcast over trailing dims; negative indices read slot 0."""
    idx = jnp.maximum(idx, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
    return jnp.take_along_axis(x, idx, axis=axis)


def _table(x_crop, N: int, C: int, fill):
    """``[N*C, P, ...]`` crop values -> per-image source table ``[N, C*P + 1, ...]`` (last row = the newline)."""
    P = x_crop.shape[1]
    x = x_crop.reshape((N, C * P) + x_crop.shape[2:])
    last = jnp.broadcast_to(jnp.asarray(fill, x.dtype), (N, 1) + x_crop.shape[2:])
    return jnp.concatenate([x, last], axis=1)


def _pool_roles(valid, is_nl, V: int):
    """``[N, S]`` bool with exactly ``V`` True per row: the valid non-newline slots plus the first invalid slots."""
    content = valid & ~is_nl
    inv = ~valid
    rank = jnp.cumsum(inv, axis=1) - 1
    return content | (inv & (rank < V - content.sum(axis=1, keepdims=True)))


def _order(keys, valid, S: int):
    """Slot order ``[N, S]``: valid slots by increasing key (stable), then the invalid ones."""
    big = jnp.int32(1 << 29)
    k = jnp.where(valid, keys, big + jnp.arange(keys.shape[1], dtype=jnp.int32)[None])
    return jnp.argsort(k, axis=1, stable=True)[:, :S]


def _add_newlines(st: NextStatic, m, A, tok, key, valid, src, hit_src):
    """Append the ``NL`` newline slots (valid iff their row has a valid entry in ``hit_src``, packed tile indices)
    and return the concatenated ``(tokens, key, valid, src, is_nl)``."""
    N = tok.shape[0]
    rows = jnp.arange(N)[:, None]
    nl_of = _take(A["nl_of"], hit_src)  # [N, K] newline ending each hit token's row
    hit_ok = (hit_src >= 0) & (nl_of >= 0)
    M = A["nl_of"].shape[1]
    hit = jnp.zeros((N, M + 1), bool).at[rows, jnp.where(hit_ok, nl_of, M)].set(True)[:, :M]
    slots = A["nl_slots"]  # [N, NL]
    nl_valid = (slots >= 0) & _take(hit, slots)
    nl_tok = jnp.broadcast_to(m.image_newline[...].astype(tok.dtype), (N, st.NL, tok.shape[-1]))
    return (jnp.concatenate([tok, nl_tok], 1), jnp.concatenate([key, slots], 1),
            jnp.concatenate([valid, nl_valid], 1), jnp.concatenate([src, slots], 1),
            jnp.concatenate([jnp.zeros(valid.shape, bool), jnp.ones(nl_valid.shape, bool)], 1))


def _finish(st: NextStatic, m, A, tok, key, valid, src, hit_src):
    """Sort the reduced tokens into the image span (``S`` slots) and add the newline policy and pool roles."""
    if st.newlines == "keep":
        tok, key, valid, src, is_nl = _add_newlines(st, m, A, tok, key, valid, src, hit_src)
    else:
        is_nl = _take(A["is_newline"], src) & (src >= 0)
    order = _order(key, valid, st.S)
    tok, valid, src, is_nl = _take(tok, order), _take(valid, order), _take(src, order), _take(is_nl, order)
    pool = _pool_roles(valid, is_nl, st.V) if st.newlines == "keep" else jnp.ones(valid.shape, bool)
    return tok, valid, pool, jnp.where(valid, src, -1)


def _vision_chain(m, specs, h, sel_valid, te, tv, grid, L: int, prefix: dict):
    """Run the vision chain on crops ``h [NC, 1+P, Dv]`` (CLIP layers before the first cut shared via ``prefix``).
    Returns ``(features at the feature layer [NC, S', Dv], source index incl. CLS [NC, S'], valid)``."""
    attn_valid = jnp.ones(h.shape[:2], bool)
    src = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32)[None], h.shape[:2])
    done = 0
    for r in specs:
        cut = L if r.vision_layer is None else r.vision_layer
        if not done < cut <= L:
            raise BudgetError(f"{type(r).__name__}: vision_layer={cut} must be in ({done}, {L}]")
        if done == 0:
            if cut not in prefix:
                prefix[cut] = clip_segment(m, h, attn_valid, 0, cut)
            hh, q, k = prefix[cut]
        else:
            hh, q, k = clip_segment(m, h, attn_valid, done, cut)
        done = cut
        red: Reduced = r(VisionContext(hidden=hh, cls_attn=cls_attention(q, k, attn_valid), keys=k, valid=sel_valid,
                                       text_embeds=te, text_valid=tv, grid=grid))
        h, attn_valid, sel_valid = red.tokens, red.valid, red.valid
        src = jnp.take_along_axis(src, red.index, axis=1)
    if done < L:
        h, _, _ = clip_segment(m, h, attn_valid, done, L)
    return h, src, attn_valid


def _vision_stage(st: NextStatic, m, A, h0, te_c, tv_c, L: int):
    """Vision-stage reducers per crop, packed in the official VisionZip NeXT order (module docstring)."""
    N, C, P = A["n_crops"].shape[0], st.C, st.P
    pp = A["patch_packed"].reshape(N * C, P)
    sel0 = jnp.concatenate([jnp.ones((N * C, 1), bool), pp >= 0], axis=1)  # CLS + unpadded patches
    prefix: dict = {}
    toks, keys, valids, srcs, hits = [], [], [], [], []
    M = st.M
    for n_v, specs in st.variants:
        h, src, ok = _vision_chain(m, specs, h0, sel0, te_c, tv_c, (st.p, st.p), L, prefix)
        h, src, ok = h[:, 1:], src[:, 1:] - 1, ok[:, 1:]  # 'default': the model drops slot 0 (CLS)
        k = h.shape[1]
        feats = m.projector(h).reshape(N, C * k, -1)
        patch = src.reshape(N, C, k)
        crop = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None, :, None], (N, C, k))
        slot = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, None, :], (N, C, k))
        flat = crop * P + jnp.maximum(patch, 0)
        packed = jnp.where(patch >= 0, _take(A["patch_packed"], flat.reshape(N, C * k)).reshape(N, C, k), -1)
        r = specs[0] if len(specs) == 1 else None
        d = r.dominant if r is not None and hasattr(r, "dominant") and hasattr(r, "contextual") else k
        is_ctx = slot >= d
        spatial = (patch >= 0) & ~is_ctx
        key = jnp.where(crop == 0, slot,
                        jnp.where(is_ctx, M + C + crop * k + slot, jnp.where(patch < 0, M + crop, packed)))
        use = (A["n_crops"] == n_v) if n_v else jnp.ones((N,), bool)
        valid = ok.reshape(N, C, k) & A["crop_valid"][:, :, None] & use[:, None, None]
        valid = valid & ~(spatial & (packed < 0))
        hit = jnp.where(valid & spatial & (crop >= 1), packed, -1)
        toks.append(feats)
        keys.append(key.reshape(N, C * k))
        valids.append(valid.reshape(N, C * k))
        srcs.append(jnp.where(valid, packed, -1).reshape(N, C * k))
        hits.append(hit.reshape(N, C * k))
    cat = functools.partial(jnp.concatenate, axis=1)
    return _finish(st, m, A, cat(toks), cat(keys), cat(valids), cat(srcs), cat(hits))


def span_context(st: NextStatic, A, feats_c, vh_c, cls_c, k_c, newline, te, tv, t2i=None) -> ProjectorContext:
    """The global projector-stage context over an image's unreduced span (``S_full`` slots, packed order).

    Per-crop inputs ``[N*C, P, ...]`` (``cls_c [N*C, heads, P]``: each crop's own CLS row) are gathered per
    packed token from *that token's crop*, so a crop's CLS attention lands on its own patches (the official
    AdaV NeXT code offsets crop ``c``'s picks by ``c`` instead of ``c * P``). Newline slots get the
    ``image_newline`` feature and zero CLS attention, keys and CLIP features; they are candidates only with
    ``newlines="prune"``; empty slots are invalid."""
    N, C = A["n_crops"].shape[0], st.C
    sp, tab = A["span_packed"], A["span_table"]
    real = sp >= 0
    nl = real & _take(A["is_newline"], sp)
    feats = jnp.where(real[..., None], _take(_table(feats_c, N, C, newline.astype(feats_c.dtype)), tab), 0)
    vh = jnp.where(real[..., None], _take(_table(vh_c, N, C, 0.0), tab), 0)
    cls = jnp.where(real[:, None], jnp.swapaxes(_take(_table(jnp.swapaxes(cls_c, 1, 2), N, C, 0.0), tab), 1, 2), 0)
    kk = jnp.where(real[..., None, None], _take(_table(k_c, N, C, 0.0), tab), 0)
    cand = real if st.newlines == "prune" else real & ~nl
    return ProjectorContext(features=feats, valid=cand, vision_hidden=vh, cls_attn=cls, keys=kk, text_embeds=te,
                            text_valid=tv, text_to_image=t2i, grid=(1, sp.shape[1]))


def encode(m: LlavaModule, reducers: tuple, st: NextStatic, px, A, te, tv, t2i_fn: TextToImage | None):
    """CLIP on all crops and the pre-LLM stages: ``px [N, C, 3, S, S]`` -> image spans ``(tokens [N, S, H],
    valid [N, S], pool [N, S], kept [N, S])`` (``kept``: packed index, -1 for CLS / empty slots)."""
    cfg = m.cfg
    N, C, P = px.shape[0], st.C, st.P
    te_c = tv_c = None
    if te is not None:
        te_c, tv_c = jnp.repeat(te, C, axis=0), jnp.repeat(tv, C, axis=0)
    L = cfg.feature_layer_index
    h0 = m.vision.embed(px.reshape((N * C,) + px.shape[2:]))  # [NC, 1+P, Dv]

    if st.mode == "vision":
        return _vision_stage(st, m, A, h0, te_c, tv_c, L)

    # full CLIP at the feature layer on every crop (+ the signals projector reducers read)
    hf, q, k = clip_segment(m, h0, None, 0, L)
    cls_c = cls_attention(q, k, None)[:, :, 1:]  # [NC, heads, P] each crop's own CLS
    vh_c, k_c = hf[:, 1:], k[:, 1:]  # [NC, P, Dv], [NC, P, heads, hd]
    feats_c = m.projector(vh_c)  # [NC, P, H]
    nlv = m.image_newline[...].astype(feats_c.dtype)
    table = _table(feats_c, N, C, nlv)  # [N, C*P+1, H]
    sp = A["span_packed"]  # [N, S_full]
    s_real = sp >= 0
    s_nl = s_real & _take(A["is_newline"], sp)
    full_tok = jnp.where(s_real[..., None], _take(table, A["span_table"]), 0)
    if st.mode == "none":
        pool = _pool_roles(s_real, s_nl, st.V) if st.newlines == "keep" else jnp.ones(sp.shape, bool)
        return full_tok, s_real, pool, jnp.where(s_real, sp, -1)

    t2i = None
    if st.need_t2i:
        layers = max(getattr(r, "shallow_layers", 0) or 0 for r in reducers if r.stage == "projector")
        qrows = max(getattr(r, "query_rows", 32) for r in reducers if getattr(r, "shallow_layers", 0))
        t2i = t2i_fn(full_tok, s_real, layers, qrows)

    proj = [r for r in reducers if r.stage == "projector"]
    if st.mode == "global":
        ctx = span_context(st, A, feats_c, vh_c, cls_c, k_c, nlv, te, tv, t2i)
        feats, fvalid, vh, cls, kk = ctx.features, ctx.valid, ctx.vision_hidden, ctx.cls_attn, ctx.keys
        idx = jnp.broadcast_to(jnp.arange(st.S_full, dtype=jnp.int32), sp.shape)
        for r in proj:
            red = r(ProjectorContext(features=feats, valid=fvalid, vision_hidden=vh, cls_attn=cls, keys=kk,
                                     text_embeds=te, text_valid=tv, text_to_image=t2i, grid=(1, feats.shape[1])))
            feats, fvalid = red.tokens, red.valid
            idx = jnp.take_along_axis(idx, red.index, axis=1)
            vh = jnp.take_along_axis(vh, red.index[..., None], axis=1)
            cls = jnp.take_along_axis(cls, red.index[:, None, :], axis=2)
            kk = jnp.take_along_axis(kk, red.index[:, :, None, None], axis=1)
            if t2i is not None:
                t2i = jnp.take_along_axis(t2i, red.index, axis=1)
        src = jnp.where(fvalid, _take(sp, idx), -1)
        fvalid = fvalid & (src >= 0)
        hit = jnp.where(fvalid & ~(_take(A["is_newline"], src)), src, -1)
        tok, tvalid, pool, kept = _finish(st, m, A, feats, src, fvalid, src, hit)
    else:  # per_crop
        pp = A["patch_packed"]  # [N, C*P]
        cvalid = (pp >= 0).reshape(N * C, P)
        t2i_c = None
        if t2i is not None:
            so = _take(A["span_of_packed"], pp)  # [N, C*P] span slot of each crop patch
            t2i_c = jnp.where((pp >= 0) & (so >= 0), _take(t2i, so), 0.0).reshape(N * C, P)
        toks, keys, valids = [], [], []
        for n_v, specs in st.variants:
            feats, fvalid, idx = feats_c, cvalid, jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), cvalid.shape)
            vh, cls, kk, tt = vh_c, cls_c, k_c, t2i_c
            for r in specs:
                red = r(ProjectorContext(features=feats, valid=fvalid, vision_hidden=vh, cls_attn=cls, keys=kk,
                                         text_embeds=te_c, text_valid=tv_c, text_to_image=tt, grid=(st.p, st.p)))
                feats, fvalid = red.tokens, red.valid
                idx = jnp.take_along_axis(idx, red.index, axis=1)
                vh = jnp.take_along_axis(vh, red.index[..., None], axis=1)
                cls = jnp.take_along_axis(cls, red.index[:, None, :], axis=2)
                kk = jnp.take_along_axis(kk, red.index[:, :, None, None], axis=1)
                if tt is not None:
                    tt = jnp.take_along_axis(tt, red.index, axis=1)
            kc = feats.shape[1]
            crop = jnp.arange(N * C, dtype=jnp.int32)[:, None] % C
            packed = _take(pp, (crop * P + idx).reshape(N, C * kc))  # [N, C*kc]
            use = (A["n_crops"] == n_v) if n_v else jnp.ones((N,), bool)
            ok = fvalid.reshape(N, C * kc) & (packed >= 0) & use[:, None]
            toks.append(feats.reshape(N, C * kc, -1))
            keys.append(packed)
            valids.append(ok)
        cat = functools.partial(jnp.concatenate, axis=1)
        key, ok = cat(keys), cat(valids)
        src = jnp.where(ok, key, -1)
        tok, tvalid, pool, kept = _finish(st, m, A, cat(toks), key, ok, src, src)
    return tok, tvalid, pool, kept


# ---------------------------------------------------------------------------------------------------
# Host side: input validation
def check_anyres(cfg, pixel_values, image_sizes, n_img_tok: int):
    """llava_next: validate ``pixel_values [N, crops, C, S, S]`` (or HF's 4-D concatenation / list of
    per-image ``[crops_i, C, S, S]``) against ``image_sizes [N, 2]`` (height, width); pad the crops to the
    config's maximum (one static shape) and build the packing layout."""
    geom = AnyresGeometry.from_config(cfg)
    if image_sizes is None:
        raise InputError("llava_next inputs need image_sizes [N, 2] (original height, width of each image), as "
                         "returned by the HF LlavaNextImageProcessor / jaxprune.processing_anyres")
    sizes = as_numpy(image_sizes, "image_sizes")
    if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.shape[0] == 0:
        raise InputError(f"image_sizes must be [N, 2] (height, width), got shape {sizes.shape}")
    if not (np.issubdtype(sizes.dtype, np.integer) or (np.issubdtype(sizes.dtype, np.floating)
                                                      and np.all(sizes == np.round(sizes)))):
        raise InputError(f"image_sizes must be integers, got {sizes.dtype}")
    if (sizes < 1).any():
        raise InputError(f"image_sizes must be positive, got {sizes[np.any(sizes < 1, axis=1)][0].tolist()} "
                         f"(image {int(np.flatnonzero(np.any(sizes < 1, axis=1))[0])})")
    sizes = sizes.astype(np.int64)
    N = sizes.shape[0]
    layout = build_layout(geom, sizes)
    need = layout.num_crops  # [N]
    C_max = geom.max_crops
    if isinstance(pixel_values, (list, tuple)):
        parts = [as_numpy(p, f"pixel_values[{i}]") for i, p in enumerate(pixel_values)]
        if len(parts) != N:
            raise InputError(f"pixel_values is a list of {len(parts)} images but image_sizes has {N} rows")
        for i, p in enumerate(parts):
            if p.ndim != 4:
                raise InputError(f"pixel_values[{i}] must be [crops, C, S, S], got shape {p.shape}")
        px = np.zeros((N, max(p.shape[0] for p in parts)) + parts[0].shape[1:], parts[0].dtype)
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise InputError(f"pixel_values list entries differ in [C, S, S]: {[p.shape for p in parts]}")
        for i, p in enumerate(parts):
            px[i, : p.shape[0]] = p
    else:
        px = as_numpy(pixel_values, "pixel_values")
    if px.ndim == 4:  # HF also accepts the crops of all images concatenated: [sum crops_i, C, S, S]
        if px.shape[0] != need.sum():
            raise InputError(
                f"4-D pixel_values hold {px.shape[0]} crops but image_sizes imply {int(need.sum())} "
                f"({need.tolist()} per image); pass [N, crops, C, S, S] or all crops of every image")
        starts = np.concatenate([[0], np.cumsum(need)])
        flat = px
        px = np.zeros((N, int(need.max())) + flat.shape[1:], flat.dtype)
        for i in range(N):
            px[i, : need[i]] = flat[starts[i]:starts[i + 1]]
    if px.ndim != 5:
        raise InputError(f"llava_next pixel_values must be [N, crops, C, S, S], got shape {px.shape}")
    if px.shape[0] != N:
        raise InputError(f"pixel_values has {px.shape[0]} images but image_sizes has {N} rows")
    if px.shape[1] > C_max:
        raise InputError(f"pixel_values has {px.shape[1]} crops per image but the config's image_grid_pinpoints "
                         f"allow at most {C_max} (1 base + the largest grid): processor and model pinpoints differ?")
    short = np.flatnonzero(need > px.shape[1])
    if short.size:
        i = int(short[0])
        raise InputError(
            f"pixel_values has {px.shape[1]} crops per image but image {i} of size (h, w) = "
            f"{tuple(sizes[i].tolist())} needs {int(need[i])} (1 base + a {layout.tiles[i, 0]}x{layout.tiles[i, 1]} "
            "grid of tiles)")
    check_pixels(cfg, px.reshape((-1,) + px.shape[2:]))
    if n_img_tok != layout.num_tokens.sum():
        raise InputError(
            f"input_ids contain {n_img_tok} image tokens (id {cfg.image_token_index}) but image_sizes imply "
            f"{int(layout.num_tokens.sum())} visual tokens ({layout.num_tokens.tolist()} per image): expand each "
            "<image> as the HF LlavaNextProcessor does (jaxprune.processing_anyres.num_image_tokens)")
    if px.shape[1] < C_max:
        px = np.concatenate([px, np.zeros((N, C_max - px.shape[1]) + px.shape[2:], px.dtype)], axis=1)
    return px, layout


class LlavaNextFamily:
    """LLaVA-NeXT (``model_type="llava_next"``): an image = a base crop + anyres tiles (segments of ``P`` patches)
    packed with ``image_newline`` tokens (:mod:`jaxprune.models.anyres`); see the module docstring."""

    name = "llava_next"

    def check_visual(self, cfg, pixel_values, image_sizes, n_image_tokens: int) -> VisualInputs:
        px, layout = check_anyres(cfg, pixel_values, image_sizes, n_image_tokens)
        return VisualInputs(pixel_values=px, span_tokens=np.asarray(layout.num_tokens, np.int64), layout=layout,
                            image_sizes=np.asarray(image_sizes))

    def static(self, cfg, reducers: tuple, options, ipr: int, visual: VisualInputs) -> NextStatic:
        if options is not None and not isinstance(options, NextOptions):
            raise ValueError(f"{options.stage}() does not apply to llava_next models; use next_options()")
        opts = options if isinstance(options, NextOptions) else NextOptions(reducer=None)
        return build_static(cfg, reducers, opts, ipr)

    def tables(self, cfg, visual: VisualInputs, st: NextStatic) -> dict[str, np.ndarray]:
        return layout_tables(visual.layout, st)

    def encode(self, m, st: NextStatic, reducers: tuple, px, tables: dict, te, tv, t2i: TextToImage | None):
        return encode(m, reducers, st, px, tables, te, tv, t2i)


FAMILY = register("llava_next", LlavaNextFamily())
