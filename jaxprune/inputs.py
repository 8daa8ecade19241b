"""Validation and static-shape bucketing of HF-style model inputs (host side, before any jit).

Bad input is refused with a message that names the problem: wrong pixel shape or channel count,
NaN/inf pixels, image-token counts that do not match the images, mask/ids shape mismatches,
out-of-vocabulary ids, rows with no valid token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune.config import LlavaConfig
from jaxprune.errors import JaxpruneError


class InputError(JaxpruneError, ValueError):
    """Inputs that cannot be run; the message says which argument and why."""


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: jnp.ndarray      # [B, Tb] int32, right-padded to the bucket
    pixel_values: jnp.ndarray | None  # [N, C, S, S]
    valid: jnp.ndarray          # [B, Tb] bool
    positions: jnp.ndarray      # [B, Tb] int32 RoPE positions
    length: int                 # T before bucketing
    image_sizes: np.ndarray | None = None  # [N, 2] (height, width), NeXT only
    anyres: Any = None          # NeXT only: jaxprune.models.anyres.AnyresLayout (host numpy)


def _as_np(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        raise InputError(f"{name} is not array-like: {e}") from e


def bucket_length(t: int, bucket: int) -> int:
    return t if bucket <= 1 else -(-t // bucket) * bucket


def check_pixels(cfg: LlavaConfig, pixel_values) -> np.ndarray:
    px = _as_np(pixel_values, "pixel_values")
    v = cfg.vision
    if px.ndim != 4:
        raise InputError(f"pixel_values must be [N, C, H, W] (NCHW), got shape {px.shape}")
    if px.shape[1] != v.num_channels:
        raise InputError(f"pixel_values has {px.shape[1]} channels, the vision tower expects {v.num_channels} "
                         f"(NCHW layout; got shape {px.shape})")
    if px.shape[2:] != (v.image_size, v.image_size):
        raise InputError(f"pixel_values images are {px.shape[2]}x{px.shape[3]}, the vision tower expects "
                         f"{v.image_size}x{v.image_size}")
    if not np.issubdtype(px.dtype, np.floating):
        raise InputError(f"pixel_values must be floating point (normalised), got dtype {px.dtype}")
    if not np.all(np.isfinite(px)):
        bad = int(np.flatnonzero(~np.isfinite(px).reshape(px.shape[0], -1).all(axis=1))[0])
        raise InputError(f"pixel_values contain NaN or inf (image {bad})")
    return px


def prepare_batch(cfg: LlavaConfig, input_ids, pixel_values=None, attention_mask=None, image_sizes=None,
                  position_ids=None, *, bucket: int = 32, dtype=jnp.float32) -> Batch:
    ids = _as_np(input_ids, "input_ids")
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [B, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise InputError(f"input_ids is empty (shape {ids.shape})")
    if attention_mask is None:
        mask = np.ones((B, T), bool)
    else:
        mask = _as_np(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask must contain only 0 and 1")
        mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise InputError(f"rows {np.flatnonzero(~mask.any(axis=1)).tolist()} of attention_mask have no valid token")
    img_tok = cfg.image_token_index
    is_img = (ids == img_tok) & mask
    vocab = cfg.text.vocab_size
    oov = mask & (ids != img_tok) & ((ids < 0) | (ids >= vocab))
    if oov.any():
        r, c = np.argwhere(oov)[0]
        raise InputError(f"input_ids[{r}, {c}] = {ids[r, c]} is outside the vocabulary [0, {vocab})")
    n_img_tok = int(is_img.sum())
    px = None
    if pixel_values is None:
        if n_img_tok:
            raise InputError(f"input_ids contain {n_img_tok} image tokens (id {img_tok}) but no pixel_values were given")
    elif cfg.model_type == "llava_next":
        px, layout = _prepare_anyres(cfg, pixel_values, image_sizes, n_img_tok)
    else:
        px = check_pixels(cfg, pixel_values)
        if cfg.model_type == "llava":
            want = px.shape[0] * cfg.tokens_per_image
            if n_img_tok != want:
                raise InputError(
                    f"input_ids contain {n_img_tok} image tokens (id {img_tok}) but {px.shape[0]} image(s) give "
                    f"{want} visual tokens ({cfg.tokens_per_image} per image): expand each <image> to "
                    f"{cfg.tokens_per_image} tokens as the HF processor does")
    if position_ids is None:
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    else:
        pos = _as_np(position_ids, "position_ids")
        if pos.shape != ids.shape:
            raise InputError(f"position_ids shape {pos.shape} does not match input_ids shape {ids.shape}")
    Tb = bucket_length(T, bucket)
    pad_id = 0 if img_tok != 0 else 1
    ids_b = np.full((B, Tb), pad_id, np.int32)
    ids_b[:, :T] = np.where(mask, ids, pad_id)  # padded slots never count as image tokens
    valid_b = np.zeros((B, Tb), bool)
    valid_b[:, :T] = mask
    pos_b = np.zeros((B, Tb), np.int32)
    pos_b[:, :T] = pos
    if cfg.model_type == "llava_next" and px is not None:
        return Batch(input_ids=jnp.asarray(ids_b), pixel_values=jnp.asarray(px, dtype=dtype),
                     valid=jnp.asarray(valid_b), positions=jnp.asarray(pos_b), length=T,
                     image_sizes=np.asarray(image_sizes), anyres=layout)
    return Batch(
        input_ids=jnp.asarray(ids_b),
        pixel_values=None if px is None else jnp.asarray(px, dtype=dtype),
        valid=jnp.asarray(valid_b),
        positions=jnp.asarray(pos_b),
        length=T,
        image_sizes=None if image_sizes is None else np.asarray(image_sizes),
    )


def _prepare_anyres(cfg: LlavaConfig, pixel_values, image_sizes, n_img_tok: int):
    """llava_next: validate ``pixel_values [N, crops, C, S, S]`` (or HF's 4-D concatenation / list of
    per-image ``[crops_i, C, S, S]``) against ``image_sizes [N, 2]`` (height, width); pad the crops to the
    config's maximum (one static shape) and build the packing layout."""
    from jaxprune.models.anyres import AnyresGeometry, build_layout

    geom = AnyresGeometry.from_config(cfg)
    if image_sizes is None:
        raise InputError("llava_next inputs need image_sizes [N, 2] (original height, width of each image), as "
                         "returned by the HF LlavaNextImageProcessor / jaxprune.processing_anyres")
    sizes = _as_np(image_sizes, "image_sizes")
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
        parts = [_as_np(p, f"pixel_values[{i}]") for i, p in enumerate(pixel_values)]
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
        px = _as_np(pixel_values, "pixel_values")
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
