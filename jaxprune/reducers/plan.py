"""Running a model with reducers: the vision / projector / LLM stages and the static sequence build.

Everything here runs inside one jit per (input shapes, reducer spec): every output shape is a
function of the budgets and the input shapes only. Pre-LLM reduction shortens each image's span
in the LLM sequence from ``P`` (576) to ``budget`` tokens; the compacted sequence keeps text order
and renumbers positions (``cumsum(valid) - 1``), and visual slots a budget could not fill are
masked out of attention. Batches must hold the same number of images in every row (static length).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import generate as gen
from jaxprune.inputs import InputError
from jaxprune.models.attention import attention_rows
from jaxprune.models.llava import LlavaModule
from jaxprune.reducers.base import STAGE_ORDER, BudgetError, ProjectorContext, Reduced, VisionContext
from jaxprune.reducers.llm import check_llm_reducers, prefill_llm, run_llm


from jaxprune.reducers.compose import Compose, as_tuple, compose  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------
# Budget bookkeeping (host side, before tracing): validates every budget against the tokens present.
def visual_budget(cfg, reducers: tuple) -> int:
    """Visual tokens per image that reach the LLM after the pre-LLM reducers; validates budgets."""
    n = cfg.tokens_per_image
    full = cfg.vision_feature_select_strategy == "full"
    for r in reducers:
        if r.stage == "vision":
            patches = r.output_tokens(cfg.vision.num_patches if n == cfg.vision.num_patches + full else n - full)
            n = patches + full
        elif r.stage == "projector":
            n = r.output_tokens(n)
    return n


# ---------------------------------------------------------------------------------------------------
def _clip_segment(m: LlavaModule, h, valid, start: int, stop: int):
    """CLIP layers [start, stop) on ``h [N, S, D]`` with key mask ``valid [N, S]``; returns h, q, k of the last."""
    mask = valid[:, None, None, :]
    q = k = None
    for i in range(start, stop):
        h, q, k = m.vision.layers[i](h, mask)
    return h, q, k


def _cls_attn(q, k, valid):  # q/k [N, S, heads, hd] -> [N, heads, S]
    return attention_rows(q[:, :1], k, valid)[:, :, 0, :]


def _text_to_image(m: LlavaModule, h, positions, valid, is_img, layers: int, query_rows: int, n_img: int,
                   per_image: int):
    """Query-aware attention of the prompt's text tokens to each image token at decoder layer
    ``layers - 1`` of a shallow prefill on the full sequence: the query rows are the valid non-image
    tokens among each row's last ``query_rows`` positions, each attending causally; the result is the
    mean over heads and query rows. Returns ``[N, P]``."""
    h, _ = gen.decoder_prefill(m, h, positions, valid, range(layers - 1), 0)
    layer = m.language.layers[layers - 1]
    cos, sin = m.language.rope(positions)
    q, k, _ = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
    B, T = valid.shape
    last = gen.last_valid_index(valid)
    raw = last[:, None] - jnp.arange(query_rows)[None, ::-1]  # [B, R] may run below 0 on short rows
    rows = jnp.clip(raw, 0, T - 1)
    rvalid = jnp.take_along_axis(valid & ~is_img, rows, axis=1) & (raw >= 0)
    qr = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [B, R, N, hd]
    causal = valid[:, None, :] & (jnp.arange(T)[None, None, :] <= rows[:, :, None])  # [B, R, T]
    p = attention_rows(qr, k, causal)  # [B, heads, R, T]
    p = jnp.where(rvalid[:, None, :, None], p, 0.0).sum(axis=(1, 2)) / jnp.maximum(
        rvalid.sum(1)[:, None] * p.shape[1], 1)  # [B, T]
    flat_img = is_img.reshape(-1)
    order = jnp.argsort(~flat_img, stable=True)[: n_img * per_image]
    return p.reshape(-1)[order].reshape(n_img, per_image)


def pre_llm(m: LlavaModule, reducers: tuple, ids, px, valid, imgs_per_row: int):
    """Vision + projector stages and the compacted LLM input. Returns ``(h, valid, positions, kept, kept_valid)``."""
    cfg = m.cfg
    img_tok = cfg.image_token_index
    B, T = ids.shape
    N = px.shape[0]
    grid = (cfg.vision.grid, cfg.vision.grid)
    is_img = (ids == img_tok) & valid
    text_emb = m.embed_text(ids)
    row = jnp.arange(N) // imgs_per_row
    te, tv = text_emb[row], (valid & ~is_img)[row]

    # ---- vision stage(s)
    L = cfg.feature_layer_index
    h = m.vision.embed(px)  # [N, 1+P, Dv]
    tvalid = jnp.ones(h.shape[:2], bool)
    src = jnp.broadcast_to(jnp.arange(h.shape[1])[None], h.shape[:2])  # source index incl. CLS
    done = 0
    q = k = None
    for r in (r for r in reducers if r.stage == "vision"):
        cut = L if r.vision_layer is None else r.vision_layer
        if not done < cut <= L:
            raise BudgetError(f"{type(r).__name__}: vision_layer={cut} must be in ({done}, {L}] "
                              f"(the feature layer is hidden_states[{L}])")
        h, q, k = _clip_segment(m, h, tvalid, done, cut)
        done = cut
        red: Reduced = r(VisionContext(hidden=h, cls_attn=_cls_attn(q, k, tvalid), keys=k, valid=tvalid,
                                       text_embeds=te, text_valid=tv, grid=grid))
        h, tvalid = red.tokens, red.valid
        src = jnp.take_along_axis(src, red.index, axis=1)
        q = jnp.take_along_axis(q, red.index[:, :, None, None], axis=1)
        k = jnp.take_along_axis(k, red.index[:, :, None, None], axis=1)
    if done < L:
        h, q, k = _clip_segment(m, h, tvalid, done, L)
    cls_attn = _cls_attn(q, k, tvalid)  # [N, heads, S]
    if cfg.vision_feature_select_strategy == "default":  # drop CLS; signals stay aligned with the features
        h, fvalid, fsrc, cls_attn, k = h[:, 1:], tvalid[:, 1:], src[:, 1:] - 1, cls_attn[:, :, 1:], k[:, 1:]
    else:
        fvalid, fsrc = tvalid, src - 1  # CLS itself has source -1
    vision_hidden = h
    feats = m.projector(h)

    # ---- projector stage(s)
    for r in (r for r in reducers if r.stage == "projector"):
        t2i = None
        if getattr(r, "shallow_layers", 0):
            full_h = _merge_sequence(m, ids, valid, is_img, feats, fvalid, text_emb)[0]
            t2i = _text_to_image(m, full_h, gen.default_positions(valid), valid, is_img, r.shallow_layers,
                                 getattr(r, "query_rows", 32), N, feats.shape[1])
        red = r(ProjectorContext(features=feats, valid=fvalid, vision_hidden=vision_hidden, cls_attn=cls_attn,
                                 keys=k, text_embeds=te, text_valid=tv, text_to_image=t2i, grid=grid))
        feats, fvalid = red.tokens, red.valid
        fsrc = jnp.take_along_axis(fsrc, red.index, axis=1)
        vision_hidden = jnp.take_along_axis(vision_hidden, red.index[..., None], axis=1)
        cls_attn = jnp.take_along_axis(cls_attn, red.index[:, None, :], axis=2)
        k = jnp.take_along_axis(k, red.index[:, :, None, None], axis=1)

    # ---- compacted LLM sequence
    h_seq, valid2, img2 = _compact_sequence(m, ids, valid, is_img, feats, fvalid, text_emb, imgs_per_row)
    return h_seq, valid2, gen.default_positions(valid2), jnp.where(fvalid, fsrc, -1), fvalid, img2


def _merge_sequence(m, ids, valid, is_img, feats, fvalid, text_emb):
    """Full-length sequence (no compaction) with ``feats [N, P, H]`` in the image slots."""
    flat = feats.reshape(-1, feats.shape[-1]).astype(text_emb.dtype)
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1)
    vals = jnp.take(flat, idx, axis=0).reshape(text_emb.shape)
    return jnp.where(is_img[..., None], vals, text_emb), valid


def _compact_sequence(m, ids, valid, is_img, feats, fvalid, text_emb, imgs_per_row: int):
    """Drop the image slots beyond ``k`` per image and scatter ``feats [N, k, H]`` into the rest.

    Returns ``(h [B, T', H], valid [B, T'], is_image [B, T'])`` with ``T' = T - imgs_per_row * (P - k)``.
    """
    B, T = ids.shape
    P = m.cfg.tokens_per_image
    kk = feats.shape[1]
    within = (jnp.cumsum(is_img, axis=1) - 1) % P
    keep = ~is_img | (within < kk)
    T2 = T - imgs_per_row * (P - kk)
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :T2]  # kept slots, original order
    valid2 = jnp.take_along_axis(valid, order, axis=1)
    img2 = jnp.take_along_axis(is_img, order, axis=1)
    emb2 = jnp.take_along_axis(text_emb, order[..., None], axis=1)
    flat = feats.reshape(-1, feats.shape[-1]).astype(emb2.dtype)
    fv = fvalid.reshape(-1)
    idx = jnp.clip(jnp.cumsum(img2.reshape(-1)) - 1, 0, flat.shape[0] - 1)
    vals = jnp.take(flat, idx, axis=0).reshape(emb2.shape)
    h = jnp.where(img2[..., None], vals, emb2)
    valid2 = valid2 & (~img2 | jnp.take(fv, idx).reshape(img2.shape))
    return h, valid2, img2


# ---------------------------------------------------------------------------------------------------
def _forward_reduced(graphdef, params, ids, px, valid, *, reducers, imgs_per_row, mask_only=False):
    m = nnx.merge(graphdef, params)
    h, valid2, pos, kept, kept_valid, is_vis = pre_llm(m, reducers, ids, px, valid, imgs_per_row)
    llm = [r for r in reducers if r.stage == "llm"]
    logits, valid_out = run_llm(m, llm, h, pos, valid2, is_vis, imgs_per_row * kept.shape[1], mask_only)
    return logits, valid_out, kept, kept_valid


def _prefill_reduced(graphdef, params, ids, px, valid, *, reducers, imgs_per_row, max_new_tokens):
    m = nnx.merge(graphdef, params)
    h, valid2, pos, kept, kept_valid, is_vis = pre_llm(m, reducers, ids, px, valid, imgs_per_row)
    llm = [r for r in reducers if r.stage == "llm"]
    return prefill_llm(m, llm, h, pos, valid2, max_new_tokens, is_vis, imgs_per_row * kept.shape[1])


def _jitted(model, name: str, fn, static: tuple[str, ...]):
    cache = model.__dict__.setdefault("_reduced_jits", {})
    if name not in cache:
        cache[name] = jax.jit(functools.partial(fn, model.graphdef), static_argnames=static)
    return cache[name]


def _prepare(model, input_ids, pixel_values, attention_mask, image_sizes, reducer):
    from jaxprune.reducers.plan_next import NextOptions

    if isinstance(reducer, NextOptions):
        raise ValueError("next_options() applies to llava_next models; pass the bare reducer spec to a llava model")
    reducers = as_tuple(reducer)
    for r in reducers:
        if r.stage not in STAGE_ORDER:
            raise ValueError(f"unknown reducer stage {r.stage!r} of {type(r).__name__}")
    if model.cfg.model_type != "llava":  # llava_next goes through jaxprune.reducers.plan_next
        raise NotImplementedError(f"reducers on {model.cfg.model_type} inputs go through plan_next")
    b = model.prepare(input_ids, pixel_values, attention_mask, image_sizes)
    if b.pixel_values is None:
        raise InputError("reducers act on visual tokens: pixel_values are required")
    n_img = b.pixel_values.shape[0]
    if n_img % b.input_ids.shape[0]:
        raise InputError(f"{n_img} images for {b.input_ids.shape[0]} rows: reducers need the same number of "
                         "images in every row")
    ipr = n_img // b.input_ids.shape[0]
    counts = np.asarray((b.input_ids == model.cfg.image_token_index) & b.valid).sum(1)
    if not (counts == ipr * model.cfg.tokens_per_image).all():
        raise InputError(f"image tokens per row {counts.tolist()}: reducers need {ipr} image(s) of "
                         f"{model.cfg.tokens_per_image} tokens in every row")
    k = visual_budget(model.cfg, reducers)
    L = model.cfg.text.num_hidden_layers
    for r in reducers:
        n = getattr(r, "shallow_layers", 0) or 0
        if n > L:
            raise BudgetError(f"{type(r).__name__}.shallow_layers={n} exceeds the decoder's {L} layers")
    check_llm_reducers(model.cfg, reducers, b, ipr, k)
    return b, reducers, ipr, k


def run_forward(model, input_ids, pixel_values, attention_mask, image_sizes, reducer, position_ids=None,
                mask_only: bool = False):
    """``model(..., reducer=r)``: logits ``[B, T_out, V]`` of the reduced sequence (plus its mask).

    ``mask_only`` (reference semantics, tests): in-LLM cuts mask dropped tokens out of attention
    instead of removing them; logits then cover the full post-pre-LLM sequence."""
    from jaxprune.model import LlavaOutput

    if position_ids is not None:
        raise InputError("position_ids cannot be combined with a reducer (pre-LLM reducers renumber positions)")
    if model.cfg.model_type == "llava_next":
        from jaxprune.reducers.plan_next import run_forward_next

        return run_forward_next(model, input_ids, pixel_values, attention_mask, image_sizes, reducer, mask_only)
    b, reducers, ipr, k = _prepare(model, input_ids, pixel_values, attention_mask, image_sizes, reducer)
    fn = _jitted(model, "forward", _forward_reduced, ("reducers", "imgs_per_row", "mask_only"))
    logits, valid_out, kept, kept_valid = fn(model.params, b.input_ids, b.pixel_values, b.valid,
                                             reducers=reducers, imgs_per_row=ipr, mask_only=mask_only)
    pad = b.input_ids.shape[1] - b.length  # bucket padding sits at the end of every row
    t_out = logits.shape[1] - pad
    return LlavaOutput(logits=logits[:, :t_out], attention_mask=valid_out[:, :t_out], kept=kept,
                       kept_valid=kept_valid)


def run_generate(model, input_ids, pixel_values, attention_mask, image_sizes, reducer, max_new_tokens, eos, pad):
    if model.cfg.model_type == "llava_next":
        from jaxprune.reducers.plan_next import run_generate_next

        return run_generate_next(model, input_ids, pixel_values, attention_mask, image_sizes, reducer,
                                 max_new_tokens, eos, pad)
    b, reducers, ipr, k = _prepare(model, input_ids, pixel_values, attention_mask, image_sizes, reducer)
    fn = _jitted(model, "prefill", _prefill_reduced, ("reducers", "imgs_per_row", "max_new_tokens"))
    state = fn(model.params, b.input_ids, b.pixel_values, b.valid, reducers=reducers, imgs_per_row=ipr,
               max_new_tokens=max_new_tokens)
    return model._decode(model.params, state, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad)
