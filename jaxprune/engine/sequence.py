"""Where visual tokens sit in the LLM sequence: the host-built canonical rows and the one device placement.

* Unreduced model: the rows are the caller's (HF layout); image ``i`` owns ``n_i`` placeholder slots and the
  family hands over ``[N, S, H]`` tokens with a validity mask whose valid entries, in order, fill those slots
  (HF ``masked_scatter``; :func:`place_valid`).
* Any reducer: :func:`canonical_sequence` rebuilds every row with each image span exactly ``S_h`` slots (a
  static count), then :func:`place_spans` keeps the first ``S`` of each span and writes the family's ``[N, S, H]``
  reduced tokens into them, masking the slots a budget could not fill. Padding is moved to the side the input
  had it, so ``logits[:, -1]`` stays every row's last token on left-padded batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.inputs import InputError, bucket_length


def canonical_sequence(ids: np.ndarray, valid: np.ndarray, length: int, image_token: int,
                       span_tokens: np.ndarray, S_h: int, bucket: int, S_full: int | None = None):
    """Rows ``ids [B, T]`` (valid ``[B, T]``, real length ``length``) with image ``i``'s ``span_tokens[i]``
    placeholders replaced by exactly ``S_h`` placeholders. Returns ``(ids [B, T'], valid [B, T'], images per
    row, length')``; every row must hold the same number (>= 1) of contiguous image spans.

    The bucket is taken on the *unreduced* length (every span ``S_full`` slots, the family's maximum), then the
    ``S_full - S_h`` removed slots per image are subtracted: ``T' = bucket(length' + ipr * d) - ipr * d``. So a
    program is keyed by the input's bucket and the reduced LLM never runs on more padding than the full one."""
    pad_id = 0 if image_token != 0 else 1
    rows, per_row, img = [], [], 0
    for r in range(ids.shape[0]):
        toks = ids[r][valid[r]]
        seq, i, n_img = [], 0, 0
        while i < len(toks):
            if toks[i] == image_token:
                if img >= len(span_tokens):
                    raise InputError(f"row {r}: more image spans than images ({len(span_tokens)})")
                n = int(span_tokens[img])
                if len(toks[i:i + n]) != n or not (toks[i:i + n] == image_token).all():
                    raise InputError(f"row {r}: the image tokens of image {img} ({n} expected) are not contiguous; "
                                     "reducers need each <image> expanded in one piece")
                seq += [image_token] * S_h
                img, i, n_img = img + 1, i + n, n_img + 1
            else:
                seq.append(int(toks[i]))
                i += 1
        rows.append(seq)
        per_row.append(n_img)
    if len(set(per_row)) != 1 or per_row[0] == 0:
        raise InputError(f"images per row {per_row}: reducers need the same number (>= 1) of images in every row")
    out_len = max(map(len, rows))
    d = per_row[0] * max(0, (S_h if S_full is None else S_full) - S_h)
    T = bucket_length(out_len + d, bucket) - d
    left = bool(valid[:, length - 1].all())  # every row ends at the last column: left (or no) padding
    out = np.full((len(rows), T), pad_id, np.int32)
    ok = np.zeros((len(rows), T), bool)
    for r, seq in enumerate(rows):
        a = out_len - len(seq) if left else 0
        out[r, a:a + len(seq)], ok[r, a:a + len(seq)] = seq, True
    return out, ok, per_row[0], out_len


def place_valid(text_emb: jax.Array, is_img: jax.Array, tokens: jax.Array, tok_valid: jax.Array) -> jax.Array:
    """HF's ``masked_scatter``: the k-th image slot of ``is_img [B, T]`` (reading order across the batch) takes
    the k-th valid entry of ``tokens [N, S, H]`` (``tok_valid [N, S]``). Returns ``[B, T, H]``."""
    B, T, H = text_emb.shape
    flat = tokens.reshape(-1, H).astype(text_emb.dtype)                    # [N*S, H]
    k = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32))                   # [B*T] 1-based rank at image slots
    if tok_valid is None:  # every entry valid: the k-th slot takes entry k - 1
        src = jnp.clip(k - 1, 0, flat.shape[0] - 1)
    else:
        csum = jnp.cumsum(tok_valid.reshape(-1).astype(jnp.int32))        # [N*S]
        src = jnp.clip(jnp.searchsorted(csum, k, side="left"), 0, flat.shape[0] - 1)
    vals = jnp.take(flat, src, axis=0).reshape(B, T, H)
    return jnp.where(is_img[..., None], vals, text_emb)


def place_spans(ids: jax.Array, valid: jax.Array, is_img: jax.Array, text_emb: jax.Array, tokens: jax.Array,
                tok_valid: jax.Array, pool: jax.Array, S_h: int, imgs_per_row: int):
    """Canonical rows (every image span ``S_h`` slots) -> the LLM input with ``tokens [N, S, H]`` in the first
    ``S`` slots of each span (the other ``S_h - S`` removed). Returns ``(h [B, T2, H], valid [B, T2],
    is_pool [B, T2])`` with ``T2 = T - imgs_per_row * (S_h - S)``; ``is_pool`` marks the visual slots in-LLM
    reducers choose from (``pool [N, S]``)."""
    T = ids.shape[1]
    S = tokens.shape[1]
    if S_h != S:
        within = (jnp.cumsum(is_img, axis=1) - 1) % S_h
        keep = ~is_img | (within < S)
        T2 = T - imgs_per_row * (S_h - S)
        order = jnp.argsort(~keep, axis=1, stable=True)[:, :T2]
        valid = jnp.take_along_axis(valid, order, axis=1)
        is_img = jnp.take_along_axis(is_img, order, axis=1)
        text_emb = jnp.take_along_axis(text_emb, order[..., None], axis=1)
    H = tokens.shape[-1]
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, tokens.shape[0] * S - 1)
    vals = jnp.take(tokens.reshape(-1, H).astype(text_emb.dtype), idx, axis=0).reshape(text_emb.shape)
    sv = jnp.take(tok_valid.reshape(-1), idx).reshape(is_img.shape)
    sp = jnp.take(pool.reshape(-1), idx).reshape(is_img.shape)
    h = jnp.where(is_img[..., None], vals, text_emb)
    return h, jnp.where(is_img, sv, valid), is_img & sp
