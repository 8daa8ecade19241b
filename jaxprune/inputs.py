"""Validation and static-shape bucketing of HF-style model inputs (host side, before any jit).

Bad input is refused with a message that names the problem: wrong pixel shape or channel count,
NaN/inf pixels, image-token counts that do not match the images, mask/ids shape mismatches,
out-of-vocabulary ids, rows with no valid token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxprune.config import LlavaConfig
from jaxprune.errors import JaxpruneError


class InputError(JaxpruneError, ValueError):
    """Inputs that cannot be run; the message says which argument and why."""


def as_numpy(x, name: str) -> np.ndarray:
    """``np.asarray(x)``; an :class:`InputError` naming ``name`` if ``x`` is not array-like."""
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        raise InputError(f"{name} is not array-like: {e}") from e


def bucket_length(t: int, bucket: int) -> int:
    return t if bucket <= 1 else -(-t // bucket) * bucket


def check_pixels(cfg: LlavaConfig, pixel_values, name: str = "pixel_values", what: str = "image") -> np.ndarray:
    """Validate single-crop pixels ``[N, C, S, S]``; errors name the argument ``name`` and call items ``what``."""
    px = as_numpy(pixel_values, name)
    v = cfg.vision
    if px.ndim != 4:
        raise InputError(f"{name} must be [N, C, H, W] (NCHW), got shape {px.shape}")
    if px.shape[1] != v.num_channels:
        raise InputError(f"{name} has {px.shape[1]} channels, the vision tower expects {v.num_channels} "
                         f"(NCHW layout; got shape {px.shape})")
    if px.shape[2:] != (v.image_size, v.image_size):
        raise InputError(f"{name} {what}s are {px.shape[2]}x{px.shape[3]}, the vision tower expects "
                         f"{v.image_size}x{v.image_size}")
    if not np.issubdtype(px.dtype, np.floating):
        raise InputError(f"{name} must be floating point (normalised), got dtype {px.dtype}")
    if not np.all(np.isfinite(px)):
        bad = int(np.flatnonzero(~np.isfinite(px).reshape(px.shape[0], -1).all(axis=1))[0])
        raise InputError(f"{name} contain NaN or inf ({what} {bad})")
    return px


@dataclasses.dataclass(frozen=True)
class TextInputs:
    """Validated ``input_ids`` / mask / positions (host numpy, unbucketed)."""

    input_ids: np.ndarray   # [B, T] int
    mask: np.ndarray        # [B, T] bool
    positions: np.ndarray   # [B, T] int
    image_tokens: int       # valid placeholder tokens in the batch


def check_text(cfg: LlavaConfig, input_ids, attention_mask=None, position_ids=None) -> TextInputs:
    """Validate the text side of a batch: shapes, dtypes, the mask, out-of-vocabulary ids, empty rows.
    ``position_ids`` default to ``cumsum(mask) - 1`` (HF ``generate``'s rule)."""
    ids = as_numpy(input_ids, "input_ids")
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
        mask = as_numpy(attention_mask, "attention_mask")
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
    if position_ids is None:
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    else:
        pos = as_numpy(position_ids, "position_ids")
        if pos.shape != ids.shape:
            raise InputError(f"position_ids shape {pos.shape} does not match input_ids shape {ids.shape}")
    return TextInputs(input_ids=ids, mask=mask, positions=pos, image_tokens=int(is_img.sum()))
