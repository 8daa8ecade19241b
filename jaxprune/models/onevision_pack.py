"""LLaVA-OneVision feature packing as host-built *taps*: every placeholder token is a weighted sum of at most 4
projected patch features (or the ``image_newline``), so one jitted gather serves every image size.

HF (``LlavaOnevisionModel.pack_image_features`` / ``get_video_features`` / ``apply_pooling``) builds, per input:

* **single image** (its row holds one image): ``[base crop: P] + [tile grid]`` where the tile grid is the
  ``(gh*p) x (gw*p)`` map of the anyres tiles' features, unpadded (``unpad_image``, HF rounding), then -- with
  ``vision_aspect_ratio="anyres_max_N"`` -- if ``ratio = sqrt(R * C / (N * p^2)) > 1.1`` bilinearly resized
  (``F.interpolate(mode="bilinear")``: ``align_corners=False``, no antialias) to ``(int(R // ratio), int(C //
  ratio))``; ``image_newline`` after each row; row-major;
* **image of a multi-image row** (``batch_num_images > 1``): the base crop only, ``P`` tokens + one newline;
* **video** ``[F, 3, S, S]``: each frame's ``p x p`` features bilinearly pooled to ``ceil(p/2) x ceil(p/2)``
  (``apply_pooling``), frames concatenated, then **one** newline.

A tap table ``(index [n, 4], weight [n, 4])`` per input: index ``c * P + j`` is patch ``j`` of the input's crop /
frame ``c``; ``-1`` is the newline (weight 1 on tap 0). Plain tokens use one tap of weight 1. The bilinear
weights follow PyTorch's CPU kernel (``area_pixel_compute_source_index``: float32 ``scale = in / out``,
``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``i1 = i0 + (i0 < in - 1)``).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from jaxprune.processing_anyres import anyres_grid, unpad_box

NEWLINE = -1


def max_patches(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"`` (the cap on the unpadded tile grid, in crops); anything else is refused."""
    m = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not implemented (expected 'anyres_max_N', "
                         "as every LLaVA-OneVision release)")
    return int(m.group(1))


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D taps of ``F.interpolate(mode="bilinear", align_corners=False)`` from ``n_in`` to ``n_out`` samples:
    ``(i0, i1, w0, w1)``, each ``[n_out]`` (weights float32, as PyTorch computes them)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def grid_taps(rows: np.ndarray, cols: np.ndarray, R2: int, C2: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resize of a ``len(rows) x len(cols)`` grid whose cell ``(y, x)`` is source index ``rows[y] +
    cols[x]`` (any separable index map) to ``R2 x C2``: ``(index [R2, C2, 4], weight [R2, C2, 4])``."""
    y0, y1, wy0, wy1 = bilinear_taps(len(rows), R2)
    x0, x1, wx0, wx1 = bilinear_taps(len(cols), C2)
    idx = np.stack([rows[y0][:, None] + cols[x0][None], rows[y0][:, None] + cols[x1][None],
                    rows[y1][:, None] + cols[x0][None], rows[y1][:, None] + cols[x1][None]], axis=-1)
    w = np.stack([wy0[:, None] * wx0[None], wy0[:, None] * wx1[None],
                  wy1[:, None] * wx0[None], wy1[:, None] * wx1[None]], axis=-1).astype(np.float32)
    return idx, w


def capped_grid(R: int, C: int, p: int, max_n: int) -> tuple[int, int]:
    """The packed tile-grid size after the ``anyres_max_N`` cap (HF's ``ratio > 1.1`` rule)."""
    ratio = math.sqrt(R * C / (max_n * p ** 2))
    if ratio > 1.1:
        return int(R // ratio), int(C // ratio)
    return R, C


def image_tokens(height: int, width: int, pinpoints: Sequence[Sequence[int]], crop: int, p: int, max_n: int) -> int:
    """Placeholder tokens of a single image of ``(height, width)`` (``LlavaOnevisionProcessor``'s count)."""
    gh, gw = anyres_grid((height, width), pinpoints, crop)
    r0, r1, c0, c1 = unpad_box(height, width, gh * p, gw * p, "hf")
    R2, C2 = capped_grid(r1 - r0, c1 - c0, p, max_n)
    return p * p + R2 * (C2 + 1)


def max_image_tokens(pinpoints: Sequence[Sequence[int]], crop: int, p: int, max_n: int) -> int:
    """An upper bound of :func:`image_tokens` over every image size: each pinpoint's grid with every unpadded
    height (full width) and every unpadded width (full height)."""
    best = 0
    for h, w in pinpoints:
        R, C = (h // crop) * p, (w // crop) * p
        for r, c in [(r, C) for r in range(1, R + 1)] + [(R, c) for c in range(1, C + 1)]:
            R2, C2 = capped_grid(r, c, p, max_n)
            best = max(best, p * p + R2 * (C2 + 1))
    return best


def _plain(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One tap of weight 1 per token (``index [n]``; ``NEWLINE`` entries included)."""
    idx = np.zeros((len(index), 4), np.int64)
    idx[:, 0] = index
    w = np.zeros((len(index), 4), np.float32)
    w[:, 0] = 1
    return idx, w


def image_taps(height: int, width: int, pinpoints: Sequence[Sequence[int]], crop: int, p: int, max_n: int
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Taps of a single image (base crop 0, tiles ``1 + row * gw + col``): ``(index [n, 4], weight [n, 4],
    crops)`` with ``n`` = :func:`image_tokens`."""
    P = p * p
    gh, gw = anyres_grid((height, width), pinpoints, crop)
    r0, r1, c0, c1 = unpad_box(height, width, gh * p, gw * p, "hf")
    rr, cc = np.arange(r0, r1), np.arange(c0, c1)
    row_part = (1 + (rr // p) * gw) * P + (rr % p) * p  # separable: crop-row offset + patch row
    col_part = (cc // p) * P + (cc % p)                  # crop-col offset + patch col
    R2, C2 = capped_grid(len(rr), len(cc), p, max_n)
    if (R2, C2) != (len(rr), len(cc)):
        gidx, gw_ = grid_taps(row_part, col_part, R2, C2)
    else:
        gidx, gw_ = _plain((row_part[:, None] + col_part[None]).reshape(-1))
        gidx, gw_ = gidx.reshape(R2, C2, 4), gw_.reshape(R2, C2, 4)
    nl_i, nl_w = _plain(np.full(R2, NEWLINE))
    gidx = np.concatenate([gidx, nl_i[:, None]], axis=1).reshape(-1, 4)
    gw_ = np.concatenate([gw_, nl_w[:, None]], axis=1).reshape(-1, 4)
    bi, bw = _plain(np.arange(P))
    return np.concatenate([bi, gidx]), np.concatenate([bw, gw_]), 1 + gh * gw


def multi_image_taps(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of an image in a multi-image row: the base crop's ``P`` tokens and one newline."""
    return _plain(np.concatenate([np.arange(p * p), [NEWLINE]]))


def pooled_side(p: int) -> int:
    """Side of a video frame's pooled grid (``ceil(p / 2)``: 27 -> 14)."""
    return math.ceil(p / 2)


def video_taps(frames: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of a ``frames``-frame video: each frame pooled ``p x p -> q x q`` (``q = ceil(p/2)``), frame-major,
    then one newline: ``frames * q * q + 1`` tokens."""
    q = pooled_side(p)
    P = p * p
    fi, fw = grid_taps(np.arange(p) * p, np.arange(p), q, q)  # one frame, [q, q, 4]
    fi, fw = fi.reshape(-1, 4), fw.reshape(-1, 4)
    idx = np.concatenate([fi + f * P for f in range(frames)])
    w = np.concatenate([fw] * frames)
    ni, nw = _plain(np.array([NEWLINE]))
    return np.concatenate([idx, ni]), np.concatenate([w, nw])
