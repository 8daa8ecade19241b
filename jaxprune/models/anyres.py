"""LLaVA-NeXT feature packing with static shapes: one host-built gather index per image, one jitted gather.

HF (``LlavaNextModel.pack_image_features``) builds, per image, a variable-length sequence::

    [base crop: P tokens] + [unpadded (gh*p) x (gw*p) tile-feature grid, row-major, image_newline after each row]

(``P = p*p``, ``p = image_size // patch_size``; the unpadding cuts the rows or columns that cover the black
padding, computed from the original ``image_sizes``). Its length depends on the image's aspect ratio, so a jitted
version would recompile per mix of aspect ratios. Here:

* **host** (:func:`build_layout`, numpy, from ``image_sizes`` only): per image a gather index ``[M]`` into the
  per-image source table ``[crop 0 (P) ; crop 1 (P) ; ... ; crop C-1 (P) ; image_newline (1)]`` (``C`` = the
  config's max crops, ``M`` = the max token count over the pinpoints: 2928 for llava-v1.6 at 336/14), plus a
  validity mask. Valid entries come first, in HF's order; the tail is padding.
* **device** (:func:`pack`, jittable): ``take_along_axis`` over the source table -> ``packed [N, M, H]``
  (padding zeroed), and :func:`merge_packed` scatters the *valid* packed entries, in order, into the image-token
  slots of ``input_ids`` (the k-th image token takes the k-th valid entry over the flattened ``[N*M]`` packing;
  found with ``searchsorted`` on the cumulative mask, so any mask works, not only prefix masks).

Every shape depends only on (N, the config): a batch mixing tall, wide and square images runs through one
compiled function. :class:`AnyresLayout` also carries a per-token map for reducers: ``crop`` (0 = base,
``1 + tile_row * gw + tile_col`` = tiles, -1 = newline/padding), ``row`` / ``col`` (patch coordinates inside
the crop, -1 for newline/padding), ``is_newline``, and ``crop_valid [N, C]`` (which crops are real, not
zero-padding) for vision-stage reducers that act per crop before packing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.config import LlavaConfig
from jaxprune.processing_anyres import (
    anyres_grid,
    check_pinpoints,
    max_crops,
    max_image_tokens,
    unpad_box,
)


@dataclasses.dataclass(frozen=True)
class AnyresGeometry:
    """Static anyres shape facts of a config (hashable)."""

    crop_size: int                         # S: the vision tower's image size
    grid: int                              # p = S // patch_size
    pinpoints: tuple[tuple[int, int], ...]  # (height, width), HF's order
    rounding: str = "hf"                   # unpad rounding, see processing_anyres.unpad_box

    @classmethod
    def from_config(cls, cfg: LlavaConfig) -> AnyresGeometry:
        if cfg.model_type != "llava_next":
            raise ValueError(f"anyres packing needs a llava_next config, got model_type={cfg.model_type!r}")
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                "llava_next with vision_feature_select_strategy='full' is not implemented (HF cannot reshape "
                "P + 1 tokens per crop into the tile grid either)")
        S = cfg.vision.image_size
        return cls(crop_size=S, grid=cfg.vision.grid, pinpoints=check_pinpoints(cfg.image_grid_pinpoints, S))

    @property
    def tokens_per_crop(self) -> int:
        return self.grid * self.grid

    @property
    def max_crops(self) -> int:
        return max_crops(self.pinpoints, self.crop_size)

    @property
    def max_tokens(self) -> int:
        return max_image_tokens(self.pinpoints, self.crop_size, self.crop_size // self.grid)

    @property
    def newline_index(self) -> int:
        """Row of ``image_newline`` in the per-image source table."""
        return self.max_crops * self.tokens_per_crop


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """Host-side (numpy) packing plan of N images; every array is ``[N, M]`` unless noted."""

    gather_index: np.ndarray  # int32, row of [crops*P ; newline] each packed token comes from
    valid: np.ndarray         # bool, a real token (True for the first num_tokens[i] entries)
    crop: np.ndarray          # int32, 0 = base, 1.. = tile (row-major), -1 = newline / padding
    row: np.ndarray           # int32, patch row inside the crop, -1 = newline / padding
    col: np.ndarray           # int32, patch col inside the crop, -1 = newline / padding
    is_newline: np.ndarray    # bool
    num_tokens: np.ndarray    # [N] int64, HF's per-image count
    num_crops: np.ndarray     # [N] int64, 1 + gh * gw
    tiles: np.ndarray         # [N, 2] int64, (gh, gw)
    unpad: np.ndarray         # [N, 4] int64, (r0, r1, c0, c1) kept in the (gh*p) x (gw*p) tile-feature grid
    crop_valid: np.ndarray    # [N, C] bool

    @property
    def device_arrays(self) -> tuple[jax.Array, jax.Array]:
        """What the jitted forward needs: ``(gather_index, valid)``."""
        return jnp.asarray(self.gather_index), jnp.asarray(self.valid)


def image_layout(geom: AnyresGeometry, height: int, width: int) -> dict[str, np.ndarray]:
    """Unpadded packing of one image (length = its token count), HF's order."""
    p, P, S = geom.grid, geom.tokens_per_crop, geom.crop_size
    gh, gw = anyres_grid((height, width), geom.pinpoints, S)
    r0, r1, c0, c1 = unpad_box(height, width, gh * p, gw * p, geom.rounding)
    rows, cols = np.arange(r0, r1), np.arange(c0, c1)
    R, Cn = len(rows), len(cols)
    t_crop = 1 + (rows // p)[:, None] * gw + (cols // p)[None, :]            # [R, Cn]
    t_row = np.broadcast_to((rows % p)[:, None], (R, Cn))
    t_col = np.broadcast_to((cols % p)[None, :], (R, Cn))

    def grid_with_newlines(x, newline_value):  # [R, Cn] -> [R * (Cn + 1)]
        return np.concatenate([x, np.full((R, 1), newline_value)], axis=1).reshape(-1)

    base = np.arange(P)
    crop = np.concatenate([np.zeros(P, int), grid_with_newlines(t_crop, -1)])
    row = np.concatenate([base // p, grid_with_newlines(t_row, -1)])
    col = np.concatenate([base % p, grid_with_newlines(t_col, -1)])
    is_nl = np.concatenate([np.zeros(P, bool), grid_with_newlines(np.zeros((R, Cn), bool), True)])
    src = np.where(is_nl, geom.newline_index, crop * P + row * p + col)
    return {"gather_index": src, "crop": crop, "row": row, "col": col, "is_newline": is_nl,
            "tiles": (gh, gw), "unpad": (r0, r1, c0, c1)}


def build_layout(geom: AnyresGeometry, image_sizes) -> AnyresLayout:
    """Static-size packing plan for ``image_sizes [N, 2]`` (original height, width)."""
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    N, M, C = len(sizes), geom.max_tokens, geom.max_crops
    gi = np.full((N, M), geom.newline_index, np.int32)
    valid = np.zeros((N, M), bool)
    crop, row, col = (np.full((N, M), -1, np.int32) for _ in range(3))
    is_nl = np.zeros((N, M), bool)
    n_tok, n_crops = np.zeros(N, np.int64), np.zeros(N, np.int64)
    tiles, unpad = np.zeros((N, 2), np.int64), np.zeros((N, 4), np.int64)
    for i, (h, w) in enumerate(sizes):
        lay = image_layout(geom, int(h), int(w))
        n = len(lay["gather_index"])
        gi[i, :n], crop[i, :n], row[i, :n], col[i, :n] = lay["gather_index"], lay["crop"], lay["row"], lay["col"]
        is_nl[i, :n], valid[i, :n] = lay["is_newline"], True
        n_tok[i], tiles[i], unpad[i] = n, lay["tiles"], lay["unpad"]
        n_crops[i] = 1 + tiles[i, 0] * tiles[i, 1]
    crop_valid = np.arange(C)[None, :] < n_crops[:, None]
    return AnyresLayout(gather_index=gi, valid=valid, crop=crop, row=row, col=col, is_newline=is_nl,
                        num_tokens=n_tok, num_crops=n_crops, tiles=tiles, unpad=unpad, crop_valid=crop_valid)


# ---- device side (pure, jittable) ---------------------------------------------------------------------------------
def pack(crop_feats: jax.Array, newline: jax.Array, gather_index: jax.Array, valid: jax.Array) -> jax.Array:
    """``crop_feats [N, C, P, H]`` + ``newline [H]`` -> ``packed [N, M, H]`` (padding entries zeroed)."""
    N, C, P, H = crop_feats.shape
    table = jnp.concatenate(
        [crop_feats.reshape(N, C * P, H), jnp.broadcast_to(newline.astype(crop_feats.dtype), (N, 1, H))], axis=1)
    packed = jnp.take_along_axis(table, gather_index[:, :, None].astype(jnp.int32), axis=1)  # [N, M, H]
    return jnp.where(valid[:, :, None], packed, jnp.zeros((), packed.dtype))


def merge_packed(emb: jax.Array, is_img: jax.Array, packed: jax.Array, valid: jax.Array) -> jax.Array:
    """Put the valid entries of ``packed [N, M, H]`` (image-major, in order) into the ``is_img [B, T]`` slots of
    ``emb [B, T, H]``, reading order across the batch (HF ``masked_scatter``)."""
    B, T, H = emb.shape
    flat = packed.reshape(-1, H).astype(emb.dtype)                        # [N*M, H]
    csum = jnp.cumsum(valid.reshape(-1).astype(jnp.int32))                # [N*M]
    k = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32))                  # [B*T], 1-based rank at image slots
    src = jnp.clip(jnp.searchsorted(csum, k, side="left"), 0, flat.shape[0] - 1)
    vals = jnp.take(flat, src, axis=0).reshape(B, T, H)
    return jnp.where(is_img[..., None], vals, emb)


def embed(m, input_ids: jax.Array, pixel_values: jax.Array, gather_index: jax.Array, valid: jax.Array
          ) -> jax.Array:
    """Input embeddings of a llava_next batch: ``pixel_values [N, C, 3, S, S]`` -> ``[B, T, H]``."""
    N, C = pixel_values.shape[:2]
    feats = m.image_features(pixel_values.reshape((N * C,) + pixel_values.shape[2:]))  # [N*C, P, H]
    packed = pack(feats.reshape((N, C) + feats.shape[1:]), m.image_newline[...], gather_index, valid)
    return merge_packed(m.embed_text(input_ids), input_ids == m.cfg.image_token_index, packed, valid)
