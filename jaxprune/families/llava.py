"""LLaVA-1.5 (``model_type="llava"``): one image = one segment of ``P`` tokens on a ``(g, g)`` patch grid.

Pixels ``[N, C, S, S]`` (HF ``CLIPImageProcessor`` or LLaVA's ``pad`` preprocessing); each image takes ``P``
(576 for CLIP-L/336) consecutive ``image_token_index`` placeholders in ``input_ids``, images in reading order.
Vision-stage reducers cut the CLIP loop at their layer (CLS kept, grid known); projector-stage reducers see the
projected tokens with the CLS attention, keys and CLIP features of the feature layer aligned with them.
With a reducer, every row must hold the same number of images (static length); the unreduced model takes any
mix, as HF does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.tower import clip_segment, cls_attention
from jaxprune.families.base import TextToImage, VisualInputs, register
from jaxprune.inputs import InputError, check_pixels
from jaxprune.reducers.base import (INPUTS_TABLE_KEY, BudgetError, ProjectorContext, Reduced, VisionContext,
                                   align_inputs)
from jaxprune.reducers.options import OPTIONS


@dataclasses.dataclass(frozen=True)
class LlavaStatic:
    """Static layout of one LLaVA-1.5 run (hashable)."""

    P: int            # tokens per image from the tower
    ipr: int          # images per row (0: unreduced, HF layout)
    S: int            # visual tokens per image reaching the LLM
    S_h: int          # placeholder slots per image in the canonical rows
    V: int            # in-LLM pool slots per image (= S)

    @property
    def S_full(self) -> int:  # placeholder slots of an unreduced image
        return self.P

    @property
    def dense(self) -> bool:  # every token of an unreduced image is valid (placement by rank)
        return True


def visual_budget(cfg, reducers: tuple, full: bool | None = None) -> int:
    """Visual tokens per image that reach the LLM after the pre-LLM reducers; validates every budget.
    ``full``: the CLS stays a visual token (default: the config's select strategy is "full"; Video-LLaVA frames)."""
    full = cfg.vision_feature_select_strategy == "full" if full is None else bool(full)
    P = cfg.vision.num_patches
    n = P + full
    for r in reducers:
        if r.stage == "vision":
            patches = r.output_tokens(P if n == P + full else n - full)
            n = patches + full
        elif r.stage == "projector":
            n = r.output_tokens(n)
    return n


def tower_stage(m, reducers: tuple, px: jax.Array, te, tv, *, kind: str = "image", full: bool | None = None):
    """CLIP (the ``kind`` tower) with the vision-stage reducers cutting it, then the projector, on single-crop
    images ``px [N, C, S, S]``. Returns the projector-stage state ``(feats [N, K, H], valid [N, K], src [N, K]
    (patch index, -1 = CLS), vision_hidden [N, K, Dv], cls_attn [N, heads, K], keys [N, K, heads, hd])``;
    ``full``: keep the CLS as a visual token (default: the config's select strategy)."""
    cfg = m.cfg
    full = cfg.vision_feature_select_strategy == "full" if full is None else bool(full)
    grid = (cfg.vision.grid, cfg.vision.grid)
    L = cfg.feature_layer_index
    h = m.tower(kind).embed(px)  # [N, 1+P, Dv]
    tvalid = None  # every token valid until a vision-stage reducer drops some
    src = jnp.broadcast_to(jnp.arange(h.shape[1])[None], h.shape[:2])  # source index incl. CLS
    done = 0
    q = k = None
    for r in (r for r in reducers if r.stage == "vision"):
        cut = L if r.vision_layer is None else r.vision_layer
        if not done < cut <= L:
            raise BudgetError(f"{type(r).__name__}: vision_layer={cut} must be in ({done}, {L}] "
                              f"(the feature layer is hidden_states[{L}])")
        h, q, k = clip_segment(m, h, tvalid, done, cut, kind)
        done = cut
        vvalid = jnp.ones(h.shape[:2], bool) if tvalid is None else tvalid
        red: Reduced = r(VisionContext(hidden=h, cls_attn=cls_attention(q, k, vvalid), keys=k, valid=vvalid,
                                       text_embeds=te, text_valid=tv, grid=grid))
        h, tvalid = red.tokens, red.valid
        src = jnp.take_along_axis(src, red.index, axis=1)
        q = jnp.take_along_axis(q, red.index[:, :, None, None], axis=1)
        k = jnp.take_along_axis(k, red.index[:, :, None, None], axis=1)
    if done < L:
        h, q, k = clip_segment(m, h, tvalid, done, L, kind)
    if tvalid is None:
        tvalid = jnp.ones(h.shape[:2], bool)
    cls_attn = cls_attention(q, k, tvalid)  # [N, heads, S]
    if not full:  # drop CLS; signals stay aligned with the features
        h, fvalid, fsrc, cls_attn, k = h[:, 1:], tvalid[:, 1:], src[:, 1:] - 1, cls_attn[:, :, 1:], k[:, 1:]
    else:
        fvalid, fsrc = tvalid, src - 1  # CLS itself has source -1
    return m.projector(h), fvalid, fsrc, h, cls_attn, k


def projector_stage(reducers: tuple, feats, fvalid, fsrc, vision_hidden, cls_attn, k, te, tv,
                    t2i: TextToImage | None, grid: tuple[int, int], inputs: dict | None = None):
    """The projector-stage reducers in order on the state :func:`tower_stage` returns (``src`` follows each
    selection). ``inputs``: per-patch ``reducer_inputs`` ``{name: [N, P]}`` (each context gets them aligned with its
    slots). Returns ``(feats [N, S, H], valid [N, S], src [N, S])``."""
    for r in (r for r in reducers if r.stage == "projector"):
        t2i_r = None
        if getattr(r, "shallow_layers", 0):
            t2i_r = t2i(feats, fvalid, r.shallow_layers, getattr(r, "query_rows", 32))
        red = r(ProjectorContext(features=feats, valid=fvalid, vision_hidden=vision_hidden, cls_attn=cls_attn,
                                 keys=k, text_embeds=te, text_valid=tv, text_to_image=t2i_r, grid=grid,
                                 inputs=align_inputs(inputs, fsrc)))
        feats, fvalid = red.tokens, red.valid
        fsrc = jnp.take_along_axis(fsrc, red.index, axis=1)
        vision_hidden = jnp.take_along_axis(vision_hidden, red.index[..., None], axis=1)
        cls_attn = jnp.take_along_axis(cls_attn, red.index[:, None, :], axis=2)
        k = jnp.take_along_axis(k, red.index[:, :, None, None], axis=1)
    return feats, fvalid, fsrc


def encode_images(m, reducers: tuple, px: jax.Array, te, tv, t2i: TextToImage | None, *, kind: str = "image",
                  full: bool | None = None, inputs: dict | None = None):
    """Single-crop images ``px [N, C, S, S]`` -> spans ``(tokens [N, S, H], valid [N, S], pool [N, S], kept
    [N, S])`` (``kept``: source patch, -1 for CLS / empty slots): :func:`tower_stage` + :func:`projector_stage`
    (``inputs``: per-patch reducer inputs ``{name: [N, P]}``)."""
    g = m.cfg.vision.grid
    feats, fvalid, fsrc, vh, cls_attn, k = tower_stage(m, reducers, px, te, tv, kind=kind, full=full)
    feats, fvalid, fsrc = projector_stage(reducers, feats, fvalid, fsrc, vh, cls_attn, k, te, tv, t2i, (g, g),
                                          inputs)
    return feats, fvalid, jnp.ones(fvalid.shape, bool), jnp.where(fvalid, fsrc, -1)


class LlavaFamily:
    name = "llava"

    def check_visual(self, cfg, pixel_values, image_sizes, n_image_tokens: int) -> VisualInputs:
        px = check_pixels(cfg, pixel_values)
        want = px.shape[0] * cfg.tokens_per_image
        if n_image_tokens != want:
            raise InputError(
                f"input_ids contain {n_image_tokens} image tokens (id {cfg.image_token_index}) but {px.shape[0]} "
                f"image(s) give {want} visual tokens ({cfg.tokens_per_image} per image): expand each <image> to "
                f"{cfg.tokens_per_image} tokens as the HF processor does")
        return VisualInputs(pixel_values=px, span_tokens=np.full(px.shape[0], cfg.tokens_per_image, np.int64))

    def static(self, cfg, reducers: tuple, options, ipr: int, visual: VisualInputs) -> LlavaStatic:
        if isinstance(options, OPTIONS):
            raise ValueError(f"{options.stage}() applies to {'llava_next' if options.stage == 'next_options' else 'video_llava'}"
                             " models; pass the bare reducer spec to a llava model")
        P = cfg.tokens_per_image
        if not reducers:
            return LlavaStatic(P=P, ipr=ipr, S=P, S_h=P, V=P)
        S = visual_budget(cfg, reducers)
        need_t2i = any(getattr(r, "shallow_layers", 0) for r in reducers if r.stage == "projector")
        return LlavaStatic(P=P, ipr=ipr, S=S, S_h=P if need_t2i else S, V=S)

    def tables(self, cfg, visual: VisualInputs, st: LlavaStatic) -> dict[str, np.ndarray]:
        return {}

    def encode(self, m, st: LlavaStatic, reducers: tuple, px: jax.Array, tables: dict, te, tv,
               t2i: TextToImage | None):
        """Tower, vision/projector-stage reducers, projector: ``px [N, C, S, S]`` -> image spans
        ``(tokens [N, S, H], valid [N, S], pool [N, S], kept [N, S])`` (``kept``: source patch, -1 for CLS);
        ``tables["reducer_inputs"]``: the plan's validated reducer inputs, if the spec reads any."""
        return encode_images(m, reducers, px, te, tv, t2i, inputs=tables.get(INPUTS_TABLE_KEY))


FAMILY = register("llava", LlavaFamily())
