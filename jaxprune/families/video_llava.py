"""Video-LLaVA (``model_type="video_llava"``): images and videos, two CLIP towers, one projector, a Llama decoder.

As ``transformers``' ``VideoLlavaForConditionalGeneration`` (``models/video_llava/modeling_video_llava.py``):

* an **image** ``pixel_values [N_i, C, S, S]`` runs the ``image_tower``; ``hidden_states[vision_feature_layer]``
  with the select strategy ("default": CLS dropped -> ``P`` = 256 tokens at 224 px / patch 14); each image fills
  ``P`` consecutive ``image_token_index`` placeholders;
* a **video** ``pixel_values_videos [N_v, F, C, S, S]`` runs the ``video_tower`` frame by frame; each frame gives
  its hidden state at ``vision_feature_layer`` **with its CLS** (no select strategy): ``1 + P`` = 257 tokens, a
  video ``F * 257`` (8 frames: 2056) ``video_token_index`` placeholders, frame-major (frame 0's CLS, its patches,
  frame 1's CLS, ...);
* images fill the image placeholders and videos the video placeholders, each in reading order across the batch
  (HF's two ``masked_scatter``); a row may hold images, videos, both or neither.

A **segment** is one image or one video frame. On the host, :meth:`VideoLlavaFamily.check_inputs` checks both
counts against ``input_ids`` and maps the video placeholders onto the image placeholder id (the engine then sees
one kind of visual span); the device table ``order`` puts every placeholder's token in place, so rows mixing
images and videos in any order equal HF.

**Reducers** (any registered one; a batch with a reducer holds one kind of visual input: only images or only
videos, every row the same count). An image span is a LLaVA-1.5 image (:mod:`jaxprune.families.llava`). A video
span is the whole video: the budget is the *video's* tokens reaching the LLM (:func:`jaxprune.reducers.registry
.visual_tokens` = ``num_frames * (1 + P)`` = 2056), spread over frames as :func:`~jaxprune.reducers.video_options`
declares:

* ``frames="per_frame"`` (default): each pre-LLM spec runs on every frame with ``spec.per_segment(F)`` (its
  declared rule; ``budget // F`` per frame), with that frame's CLS attention, keys and ``(g, g)`` grid; the
  reduced frames are concatenated in frame order. FasterVLM's Video-LLaVA code prunes per frame by CLS attention.
* ``frames="global"``: projector-stage specs rank all ``F * (1 + P)`` tokens of the video at once (grid ``(1,
  F * (1 + P))``: grid reducers such as ``pool`` are refused); vision-stage specs are refused (they act inside the
  tower, one frame at a time).
* in-LLM specs (FastV, DART, PyramidDrop, ...) rank the row's whole visual pool (all frames) whatever ``frames``.
* temporal specs (``temporal = True``: :mod:`jaxprune.reducers.dycoke`) see the whole video by construction: a
  chain holding one runs in global mode, with the temporal spec last among the pre-LLM specs.

**The CLS of each frame** is a video token in Video-LLaVA, so it is a candidate like any patch: projector-stage
reducers may keep or drop it (its CLS attention is its attention to itself, its grid position none: grid-based
reducers see it as the first token of the frame). Vision-stage reducers (VisionZip, VisionDrop stage A) keep each
frame's CLS inside the tower (as they do on LLaVA-1.5), so their video span is ``budget + F`` tokens (one CLS per
frame beyond the patch budget).

``out.kept [N, S]`` of a video span indexes the video's HF tokens (``f * (1 + P) + j``; ``j = 0`` is frame
``f``'s CLS); of an image span, its patch (-1: CLS / empty slot), as on LLaVA-1.5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.families.base import TextToImage, VisualInputs, register
from jaxprune.families.llava import encode_images, projector_stage, tower_stage, visual_budget
from jaxprune.inputs import InputError, TextInputs, as_numpy, check_pixels
from jaxprune.reducers.base import BudgetError
from jaxprune.reducers.options import OPTIONS, VideoOptions


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """Host view of one batch's visual inputs."""

    n_images: int
    n_videos: int
    frames: int
    order: np.ndarray   # [n_placeholders]: row of the flat feature table ([images * P ; frames * (1+P)]) each takes


@dataclasses.dataclass(frozen=True)
class VideoLlavaStatic:
    """Static (hashable) layout of one Video-LLaVA run."""

    kind: str         # "image" | "video" | "mixed" (mixed: unreduced only)
    n_images: int     # images in the batch (splits the mixed pixel array)
    frames: int       # F
    P_i: int          # tokens per image (256)
    P_f: int          # tokens per frame (257)
    ipr: int          # spans per row (0: unreduced)
    frames_mode: str  # "per_frame" | "global"
    specs: tuple      # pre-LLM specs as run (per-frame: each spec's per_segment(F))
    S: int            # slots per span reaching the LLM
    S_h: int          # slots per span in the canonical rows
    V: int            # in-LLM pool slots per span
    S_full: int       # slots of an unreduced span


def _opts(options) -> VideoOptions:
    if options is None:
        return VideoOptions(reducer=None)
    if not isinstance(options, VideoOptions):
        raise ValueError(f"{options.stage}() does not apply to video_llava models; use video_options()")
    return options


def build_static(cfg, reducers: tuple, options, ipr: int, kind: str, n_images: int = 0,
                 frames: int | None = None) -> VideoLlavaStatic:
    """Validate every budget and fix the static shapes (host side, before tracing)."""
    opts = _opts(options)
    F = cfg.num_frames if frames is None else frames
    P_i, P_f = cfg.tokens_per_image, cfg.tokens_per_frame
    pre = tuple(r for r in reducers if r.stage in ("vision", "projector"))
    temporal = [i for i, r in enumerate(pre) if getattr(r, "temporal", False)]
    if temporal and kind != "video":
        raise InputError(f"{type(pre[temporal[0]]).__name__} merges across video frames: it needs video rows only")
    if temporal and temporal[-1] != len(pre) - 1 or len(temporal) > 1:
        raise BudgetError("a temporal reducer (DyCoke) must be the last pre-LLM reducer of the chain")
    mode = "global" if temporal else opts.frames  # a temporal spec sees the whole video by construction
    base = dict(kind=kind, n_images=n_images, frames=F, P_i=P_i, P_f=P_f, ipr=ipr, frames_mode=mode)
    if kind == "mixed" and reducers:
        raise InputError("reducers on video_llava need a batch of one visual kind (only images or only videos); "
                         "this batch has both: run images and videos in separate calls")
    if kind in ("image", "mixed") or not reducers:
        S_full = P_i if kind == "image" else F * P_f
        if kind == "image" and opts.reducer is not None:
            raise ValueError("video_options() applies to video rows; this batch holds images only")
        S = visual_budget(cfg, reducers) if kind == "image" else S_full
        specs = pre
    elif mode == "per_frame":
        S_full = F * P_f
        specs = tuple(r.per_segment(F) for r in pre)
        S = F * visual_budget(cfg, specs, full=True)
    else:  # global
        S_full = F * P_f
        for r in pre:
            if r.stage == "vision":
                raise BudgetError(f"{type(r).__name__} is a vision-stage reducer: it runs inside the tower, one frame "
                                  "at a time; use video_options(..., frames='per_frame')")
            if hasattr(r, "window"):
                raise BudgetError(f"{type(r).__name__} pools on the patch grid: use frames='per_frame'")
        specs = pre
        S = S_full
        for r in pre:
            S = r.output_tokens(S)
    need_t2i = any(getattr(r, "shallow_layers", 0) for r in reducers if r.stage == "projector")
    S_h = S_full if (need_t2i or not reducers) else S
    return VideoLlavaStatic(**base, specs=specs, S=S, S_h=S_h, V=S, S_full=S_full)


def check_inputs(cfg, text: TextInputs, pixel_values, pixel_values_videos, image_sizes
                 ) -> tuple[TextInputs, VisualInputs | None]:
    """Validate images and videos against their placeholders; map video placeholders onto the image id."""
    if image_sizes is not None:
        raise InputError("image_sizes: video_llava takes fixed-size images (no anyres); pass image_sizes=None")
    ids, mask = text.input_ids, text.mask
    it, vt = cfg.image_token_index, cfg.video_token_index
    is_img, is_vid = (ids == it) & mask, (ids == vt) & mask
    n_img, n_vid = int(is_img.sum()), int(is_vid.sum())
    P_i, P_f = cfg.tokens_per_image, cfg.tokens_per_frame
    imgs = vids = None
    Ni = Nv = F = 0
    if pixel_values is None:
        if n_img:
            raise InputError(f"input_ids contain {n_img} image tokens (id {it}) but no pixel_values were given")
    else:
        imgs = check_pixels(cfg, pixel_values)
        Ni = imgs.shape[0]
        if n_img != Ni * P_i:
            raise InputError(f"input_ids contain {n_img} image tokens (id {it}) but {Ni} image(s) give {Ni * P_i} "
                             f"visual tokens ({P_i} per image): expand each <image> to {P_i} tokens as "
                             "VideoLlavaProcessor does")
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
        if n_vid != Nv * F * P_f:
            raise InputError(
                f"input_ids contain {n_vid} video tokens (id {vt}) but {Nv} video(s) of {F} frames give "
                f"{Nv * F * P_f} visual tokens ({F} x {P_f} per video: each frame's {P_f - 1} patches + its CLS): "
                f"expand each <video> to {F * P_f} tokens as VideoLlavaProcessor does")
    if imgs is None and vids is None:
        return text, None
    kinds = is_img[is_img | is_vid]  # placeholders in reading order (row-major): True = image
    order = np.empty(kinds.shape[0], np.int32)
    order[kinds] = np.arange(n_img)
    order[~kinds] = Ni * P_i + np.arange(n_vid)
    if vids is None:
        px, spans = imgs, np.full(Ni, P_i, np.int64)
    elif imgs is None:
        px, spans = vids, np.full(Nv, F * P_f, np.int64)
    else:
        px = np.concatenate([imgs, vids.reshape((Nv * F,) + vids.shape[2:]).astype(imgs.dtype)], axis=0)
        spans = np.concatenate([np.full(Ni, P_i), np.full(Nv, F * P_f)]).astype(np.int64)
    new_ids = np.where(is_vid, it, ids)  # one placeholder id for the engine's spans
    text = dataclasses.replace(text, input_ids=new_ids, image_tokens=n_img + n_vid)
    return text, VisualInputs(pixel_values=px, span_tokens=spans, layout=VideoLayout(Ni, Nv, F, order))


class VideoLlavaFamily:
    """Video-LLaVA: images and videos (see the module docstring)."""

    name = "video_llava"

    def check_inputs(self, cfg, text, pixel_values, pixel_values_videos, image_sizes):
        return check_inputs(cfg, text, pixel_values, pixel_values_videos, image_sizes)

    def check_visual(self, cfg, pixel_values, image_sizes, n_image_tokens: int) -> VisualInputs:
        """Images only (the one-kind contract); calls with videos go through :meth:`check_inputs`."""
        ids = np.full((1, n_image_tokens), cfg.image_token_index)
        text = TextInputs(input_ids=ids, mask=np.ones(ids.shape, bool), positions=np.zeros(ids.shape, np.int64),
                          image_tokens=n_image_tokens)
        return check_inputs(cfg, text, pixel_values, None, image_sizes)[1]

    def static(self, cfg, reducers: tuple, options, ipr: int, visual: VisualInputs | None) -> VideoLlavaStatic:
        if options is not None and not isinstance(options, OPTIONS):
            raise ValueError(f"unknown reducer options {options!r}")
        if visual is None:  # no input (validate_reducer, FLOPs): budgets count a num_frames video
            return build_static(cfg, reducers, options, ipr, "video")
        lay: VideoLayout = visual.layout
        kind = "mixed" if lay.n_images and lay.n_videos else ("image" if lay.n_images else "video")
        return build_static(cfg, reducers, options, ipr, kind, lay.n_images, lay.frames or None)

    def tables(self, cfg, visual: VisualInputs, st: VideoLlavaStatic) -> dict[str, np.ndarray]:
        return {"order": visual.layout.order} if st.ipr == 0 else {}

    def encode(self, m, st: VideoLlavaStatic, reducers: tuple, px: jax.Array, tables: dict, te, tv,
               t2i: TextToImage | None):
        """``px``: images ``[N_i, C, S, S]``, videos ``[N_v, F, C, S, S]``, or (unreduced, both kinds) the images
        followed by every frame ``[N_i + N_v * F, C, S, S]``. Returns spans ``(tokens [N, S, H], valid, pool,
        kept)``; unreduced: one span holding every placeholder's token in reading order."""
        if st.ipr == 0:  # unreduced: HF's two masked_scatters as one gather
            parts = []
            if st.kind in ("image", "mixed"):
                imgs = px if st.kind == "image" else px[: st.n_images]
                parts.append(encode_images(m, (), imgs, None, None, None, kind="image")[0])
            if st.kind in ("video", "mixed"):
                fr = px.reshape((-1,) + px.shape[2:]) if st.kind == "video" else px[st.n_images:]
                parts.append(encode_images(m, (), fr, None, None, None, kind="video", full=True)[0])
            H = parts[0].shape[-1]
            flat = jnp.concatenate([p.reshape(-1, H) for p in parts], axis=0)
            order = tables["order"]
            tok = jnp.take(flat, order, axis=0)[None]
            ok = jnp.ones(tok.shape[:2], bool)
            return tok, ok, ok, order[None]
        if st.kind == "image":
            return encode_images(m, reducers, px, te, tv, t2i, kind="image")
        Nv, F = px.shape[:2]
        frames = px.reshape((Nv * F,) + px.shape[2:])
        te_f = None if te is None else jnp.repeat(te, F, axis=0)
        tv_f = None if tv is None else jnp.repeat(tv, F, axis=0)
        f_of = jnp.arange(Nv * F, dtype=jnp.int32)[:, None] % F
        if st.frames_mode == "per_frame" or not st.specs:
            def t2i_f(tokens, valid, layers, rows):  # the shallow prefill sees the whole video span
                K = tokens.shape[1]
                return t2i(tokens.reshape(Nv, F * K, -1), valid.reshape(Nv, F * K), layers, rows).reshape(Nv * F, K)

            tok, ok, _, kept = encode_images(m, st.specs, frames, te_f, tv_f, t2i_f, kind="video", full=True)
            k = tok.shape[1]
            kept = jnp.where(ok, f_of * st.P_f + kept + 1, -1)
            tok, ok, kept = tok.reshape(Nv, F * k, -1), ok.reshape(Nv, F * k), kept.reshape(Nv, F * k)
            return tok, ok, jnp.ones(ok.shape, bool), kept
        # global: one ranking over all frames' tokens, each with its own frame's signals
        feats, fvalid, fsrc, vh, cls_attn, keys = tower_stage(m, (), frames, te_f, tv_f, kind="video", full=True)
        K = F * st.P_f
        fsrc = f_of * st.P_f + fsrc + 1
        heads = cls_attn.shape[1]
        cls_attn = cls_attn.reshape(Nv, F, heads, st.P_f).transpose(0, 2, 1, 3).reshape(Nv, heads, K)
        feats, fvalid, fsrc = projector_stage(
            st.specs, feats.reshape(Nv, K, -1), fvalid.reshape(Nv, K), fsrc.reshape(Nv, K), vh.reshape(Nv, K, -1),
            cls_attn, keys.reshape((Nv, K) + keys.shape[2:]), te, tv, t2i, (1, K))
        return feats, fvalid, jnp.ones(fvalid.shape, bool), jnp.where(fvalid, fsrc, -1)


FAMILY = register("video_llava", VideoLlavaFamily())
