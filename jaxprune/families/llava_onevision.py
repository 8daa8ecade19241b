"""LLaVA-OneVision (``model_type="llava_onevision"``): SigLIP crops / frames -> projector -> packed spans -> Qwen2.

As ``transformers``' ``LlavaOnevisionForConditionalGeneration`` (``models/llava_onevision/modeling_llava_onevision
.py``), see :mod:`jaxprune.models.onevision_pack` for the packing rules:

* an image alone in its row: anyres crops ``[1 + gh*gw, 3, S, S]`` (base + tiles), packed as the base crop's ``P``
  tokens then the unpadded, ``anyres_max_N``-capped tile grid with ``image_newline`` per row;
* an image of a row with several images (HF ``batch_num_images > 1``): its base crop only, ``P`` + 1 newline;
* a video ``pixel_values_videos [N_v, F, 3, S, S]``: every frame through the tower, 2x2 bilinear pooling, frames
  concatenated, one newline: ``F * ceil(p/2)^2 + 1`` tokens;
* images fill the ``image_token_index`` placeholders and videos the ``video_token_index`` ones, each kind in
  reading order across the batch (HF's two ``masked_scatter``).

**Which images are "multi-image"** is HF's ``batch_num_images`` (an image-processor output). jaxprune takes the
HF inputs without it and reads it from ``input_ids``: a row's image placeholders are one single image when their
count equals that image's anyres count (``image_sizes``), else ``k >= 2`` images of ``P + 1`` tokens each (the
processor's two counts never coincide on the released geometry; where they would, the single-image reading wins,
as HF without ``batch_num_images``).

**Static shapes** (one compiled program per layout, a bounded set): all crops of the batch (images' needed crops,
then every video frame) run through the tower as one ``[Tc, 3, S, S]`` array, ``Tc`` padded up to the next of
1, 2, 3, 4, 6, 8, 12, 16, 24, ... (zero crops, never read); every placeholder token is a host-built weighted sum of
at most 4 projected patch features or the newline (:mod:`jaxprune.models.onevision_pack`: the bilinear cap and the
video pooling are fixed linear maps per image size), in a tap table padded to the same bucket series. So batches
mixing aspect ratios, single / multi-image rows and videos share a program whenever their crop and token counts
fall in the same buckets.

**Reducers**: see :mod:`jaxprune.families.onevision_spans` (one span per image / video, the CLS-free saliency).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.families.base import TextToImage, VisualInputs, register
from jaxprune.families.onevision_spans import (
    OnevisionStatic,
    bucket,
    encode_crops,
    encode_spans,
    gather_taps,
    reduced_static,
    span_tables,
)
from jaxprune.inputs import InputError, TextInputs, as_numpy, check_pixels
from jaxprune.models.onevision_pack import (
    NEWLINE,
    image_taps,
    image_tokens,
    max_patches,
    multi_image_taps,
    pooled_side,
    video_taps,
)
from jaxprune.processing_anyres import anyres_grid, check_pinpoints, max_crops


@dataclasses.dataclass(frozen=True)
class OnevisionLayout:
    """Host view of one batch's visual inputs."""

    n_images: int
    n_videos: int
    frames: int
    multi: np.ndarray          # [n_images] bool: image of a multi-image row (base crop only)
    crops: np.ndarray          # [n_images] int: crops each image runs through the tower
    tap_index: np.ndarray      # [K, 4] int: rows of the feature table ([Tc * P ; newline]) per placeholder, reading order
    tap_weight: np.ndarray     # [K, 4] float32
    n_crops: int               # real crops + frames (before the bucket)
    spans: tuple = ()          # per image / video (images first, input order): (index [n, 4], weight [n, 4]) with
                               # index into [Tc * P] and NEWLINE for the newline




def geometry(cfg) -> tuple[tuple[tuple[int, int], ...], int, int, int]:
    """``(pinpoints (h, w), crop size S, patch grid side p, anyres cap N)`` of a OneVision config."""
    S = cfg.vision.image_size
    return check_pinpoints(cfg.image_grid_pinpoints, S), S, cfg.vision.grid, max_patches(cfg.vision_aspect_ratio)


def _sizes(image_sizes, N: int) -> np.ndarray:
    if image_sizes is None:
        raise InputError("llava_onevision images need image_sizes [N, 2] (original height, width of each image), as "
                         "returned by the HF LlavaOnevisionImageProcessor / jaxprune.processing_onevision")
    sizes = as_numpy(image_sizes, "image_sizes")
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise InputError(f"image_sizes must be [N, 2] (height, width), got shape {sizes.shape}")
    if sizes.shape[0] != N:
        raise InputError(f"pixel_values has {N} images but image_sizes has {sizes.shape[0]} rows")
    if not np.issubdtype(sizes.dtype, np.integer) and not np.all(sizes == np.round(sizes)):
        raise InputError(f"image_sizes must be integers, got {sizes.dtype}")
    if (sizes < 1).any():
        raise InputError(f"image_sizes must be positive, got {sizes.tolist()}")
    return sizes.astype(np.int64)


def _image_pixels(cfg, pixel_values) -> np.ndarray:
    """``[N, crops, C, S, S]`` from HF's 5-D array or a list of per-image ``[crops_i, C, S, S]``."""
    if isinstance(pixel_values, (list, tuple)):
        parts = [as_numpy(p, f"pixel_values[{i}]") for i, p in enumerate(pixel_values)]
        if any(p.ndim != 4 for p in parts):
            raise InputError(f"pixel_values list entries must be [crops, C, S, S], got {[p.shape for p in parts]}")
        px = np.zeros((len(parts), max(p.shape[0] for p in parts)) + parts[0].shape[1:], parts[0].dtype)
        for i, p in enumerate(parts):
            if p.shape[1:] != parts[0].shape[1:]:
                raise InputError(f"pixel_values list entries differ in [C, S, S]: {[q.shape for q in parts]}")
            px[i, : p.shape[0]] = p
        return px
    px = as_numpy(pixel_values, "pixel_values")
    if px.ndim != 5:
        raise InputError(f"llava_onevision pixel_values must be [N, crops, C, S, S] (the HF image processor's "
                         f"output), got shape {px.shape}")
    return px


def _rows_of_images(cfg, is_img: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """HF's ``batch_num_images`` read from ``input_ids``: per image, True when its row holds several images."""
    pins, S, p, cap = geometry(cfg)
    P = p * p
    single = [image_tokens(int(h), int(w), pins, S, p, cap) for h, w in sizes]
    multi, i = [], 0
    for r, n in enumerate(is_img.sum(axis=1)):
        n = int(n)
        if n == 0:
            continue
        if i < len(single) and single[i] == n:
            multi.append(False)
            i += 1
        elif n % (P + 1) == 0 and n // (P + 1) >= 2 and i + n // (P + 1) <= len(single):
            multi += [True] * (n // (P + 1))
            i += n // (P + 1)
        else:
            want = single[i] if i < len(single) else None
            raise InputError(
                f"row {r} holds {n} image tokens (id {cfg.image_token_index}), which is neither image {i}'s "
                f"{want} tokens (one image alone in its row, of size {tuple(sizes[i].tolist()) if want else '-'}) "
                f"nor k >= 2 images of {P + 1} tokens (a multi-image row): expand each <image> as the HF "
                "LlavaOnevisionProcessor does (jaxprune.processing_onevision.num_image_tokens)")
    if i != len(single):
        raise InputError(f"input_ids hold the image tokens of {i} image(s) but {len(single)} were given "
                         f"(pixel_values / image_sizes)")
    return np.asarray(multi, bool)


def check_inputs(cfg, text: TextInputs, pixel_values, pixel_values_videos, image_sizes
                 ) -> tuple[TextInputs, VisualInputs | None]:
    """Validate images and videos against their placeholders; build the crop list and the tap table; map video
    placeholders onto the image id (the engine sees one kind of visual slot)."""
    ids, mask = text.input_ids, text.mask
    it, vt = cfg.image_token_index, cfg.video_token_index
    is_img, is_vid = (ids == it) & mask, (ids == vt) & mask
    n_img, n_vid = int(is_img.sum()), int(is_vid.sum())
    pins, S, p, cap = geometry(cfg)
    P = p * p
    crops_list, taps_img, taps_vid = [], [], []
    Ni = Nv = F = 0
    multi = np.zeros(0, bool)
    n_crops = np.zeros(0, np.int64)
    if pixel_values is None:
        if n_img:
            raise InputError(f"input_ids contain {n_img} image tokens (id {it}) but no pixel_values were given")
        if image_sizes is not None:
            raise InputError("image_sizes were given without pixel_values")
    else:
        px = _image_pixels(cfg, pixel_values)
        Ni = px.shape[0]
        sizes = _sizes(image_sizes, Ni)
        C_max = max_crops(pins, S)
        if px.shape[1] > C_max:
            raise InputError(f"pixel_values has {px.shape[1]} crops per image but the config's image_grid_pinpoints "
                             f"allow at most {C_max} (1 base + the largest grid): processor and model pinpoints "
                             "differ?")
        check_pixels(cfg, px.reshape((-1,) + px.shape[2:]))
        multi = _rows_of_images(cfg, is_img, sizes)
        n_crops = np.zeros(Ni, np.int64)
        start = 0
        for i in range(Ni):
            h, w = (int(x) for x in sizes[i])
            if multi[i]:
                idx, wt = multi_image_taps(p)
                need = 1
            else:
                idx, wt, need = image_taps(h, w, pins, S, p, cap)
                if need > px.shape[1]:
                    gh, gw = anyres_grid((h, w), pins, S)
                    raise InputError(
                        f"image {i} of size (h, w) = {(h, w)} maps to the {gh * S}x{gw * S} pinpoint and needs {need} "
                        f"crops (1 base + {gh}x{gw} tiles) but pixel_values has {px.shape[1]} per image: was it "
                        "preprocessed with other image_grid_pinpoints (or as part of a multi-image row)?")
            n_crops[i] = need
            crops_list.append(px[i, :need])
            taps_img.append((np.where(idx == NEWLINE, NEWLINE, idx + start * P), wt))
            start += need
    if pixel_values_videos is None:
        if n_vid:
            raise InputError(f"input_ids contain {n_vid} video tokens (id {vt}) but no pixel_values_videos were given")
    else:
        vids = as_numpy(pixel_values_videos, "pixel_values_videos")
        if vids.ndim != 5:
            raise InputError(f"pixel_values_videos must be [videos, frames, C, H, W], got shape {vids.shape}")
        Nv, F = vids.shape[:2]
        if Nv == 0 or F == 0:
            raise InputError(f"pixel_values_videos is empty (shape {vids.shape})")
        check_pixels(cfg, vids.reshape((Nv * F,) + vids.shape[2:]), "pixel_values_videos", "frame")
        per = F * pooled_side(p) ** 2 + 1
        if n_vid != Nv * per:
            raise InputError(
                f"input_ids contain {n_vid} video tokens (id {vt}) but {Nv} video(s) of {F} frames give {Nv * per} "
                f"visual tokens ({F} x {pooled_side(p)}^2 pooled + 1 newline per video): expand each <video> as "
                "LlavaOnevisionProcessor does")
        start = sum(len(c) for c in crops_list)
        for v in range(Nv):
            idx, wt = video_taps(F, p)
            crops_list.append(vids[v])
            taps_vid.append((np.where(idx == NEWLINE, NEWLINE, idx + (start + v * F) * P), wt))
    if not crops_list:
        return text, None
    flat = np.concatenate([c.astype(np.float32) for c in crops_list], axis=0)
    Tc = bucket(flat.shape[0])
    pxs = np.zeros((Tc,) + flat.shape[1:], np.float32)
    pxs[: flat.shape[0]] = flat
    cat = (lambda t, k: np.concatenate([x[k] for x in t]) if t else np.zeros((0, 4), np.int64 if k == 0 else np.float32))
    ii, iw, vi, vw = cat(taps_img, 0), cat(taps_img, 1), cat(taps_vid, 0), cat(taps_vid, 1)
    if len(ii) != n_img:  # the per-row check passed: this would be a packing bug
        raise AssertionError(f"{len(ii)} image taps for {n_img} placeholders")  # pragma: no cover
    kinds = is_img[is_img | is_vid]  # placeholders in reading order: True = image
    idx = np.empty((len(kinds), 4), np.int64)
    wt = np.empty((len(kinds), 4), np.float32)
    idx[kinds], wt[kinds], idx[~kinds], wt[~kinds] = ii, iw, vi, vw
    idx = np.where(idx == NEWLINE, Tc * P, idx)
    lay = OnevisionLayout(n_images=Ni, n_videos=Nv, frames=F, multi=multi, crops=n_crops, tap_index=idx,
                          tap_weight=wt, n_crops=flat.shape[0], spans=tuple(taps_img) + tuple(taps_vid))
    spans = np.asarray([len(t[0]) for t in taps_img] + [len(t[0]) for t in taps_vid], np.int64)
    new_ids = np.where(is_vid, it, ids)
    text = dataclasses.replace(text, input_ids=new_ids, image_tokens=n_img + n_vid)
    return text, VisualInputs(pixel_values=pxs, span_tokens=spans, layout=lay,
                              image_sizes=None if image_sizes is None else np.asarray(image_sizes))


class LlavaOnevisionFamily:
    """LLaVA-OneVision: anyres images, multi-image rows and videos (see the module docstring)."""

    name = "llava_onevision"

    def check_inputs(self, cfg, text, pixel_values, pixel_values_videos, image_sizes):
        return check_inputs(cfg, text, pixel_values, pixel_values_videos, image_sizes)

    def check_visual(self, cfg, pixel_values, image_sizes, n_image_tokens: int) -> VisualInputs:
        """Images only, all in one row (the one-kind contract); calls with videos go through :meth:`check_inputs`."""
        ids = np.full((1, n_image_tokens), cfg.image_token_index)
        text = TextInputs(input_ids=ids, mask=np.ones(ids.shape, bool), positions=np.zeros(ids.shape, np.int64),
                          image_tokens=n_image_tokens)
        return check_inputs(cfg, text, pixel_values, None, image_sizes)[1]

    def static(self, cfg, reducers: tuple, options, ipr: int, visual: VisualInputs | None) -> OnevisionStatic:
        P = cfg.vision.num_patches
        if not reducers and options is None:
            if visual is None:
                return OnevisionStatic(Tc=1, K=1, P=P)
            lay: OnevisionLayout = visual.layout
            return OnevisionStatic(Tc=int(visual.pixel_values.shape[0]), K=bucket(len(lay.tap_index)), P=P)
        return reduced_static(cfg, reducers, options, ipr, visual)

    def tables(self, cfg, visual: VisualInputs, st: OnevisionStatic) -> dict[str, np.ndarray]:
        lay: OnevisionLayout = visual.layout
        if st.ipr:
            return span_tables(lay, st)
        n = len(lay.tap_index)
        idx = np.zeros((st.K, 4), np.int32)
        wt = np.zeros((st.K, 4), np.float32)
        idx[:n], wt[:n] = lay.tap_index, lay.tap_weight
        return {"tap_index": idx, "tap_weight": wt}

    def encode(self, m, st: OnevisionStatic, reducers: tuple, px: jax.Array, tables: dict, te, tv,
               t2i: TextToImage | None):
        """Unreduced: ``px [Tc, 3, S, S]`` -> one span ``(tokens [1, K, H], valid, pool, kept)`` holding every
        placeholder's token in reading order (HF's two ``masked_scatter`` as one gather). With reducers: one span
        per image / video (:func:`jaxprune.families.onevision_spans.encode_spans`)."""
        if st.ipr:
            return encode_spans(m, st, reducers, px, tables, te, tv, t2i)
        feats = encode_crops(m, px)  # [Tc, P, H]
        tok = gather_taps(feats, m.image_newline[...], tables["tap_index"], tables["tap_weight"])  # [K, H]
        ok = jnp.ones((1, st.K), bool)
        return tok[None], ok, ok, jnp.arange(st.K, dtype=jnp.int32)[None]


FAMILY = register("llava_onevision", LlavaOnevisionFamily())
