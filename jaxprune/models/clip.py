"""CLIP ViT vision tower as used by LLaVA.

Follows ``transformers`` ``CLIPVisionModel``: patch embedding (a stride-p conv, run here as one
matmul over flattened patches), class token, learned positions, ``pre_layrnorm``, pre-LN encoder
layers with ``quick_gelu``. LLaVA reads ``hidden_states[vision_feature_layer]`` without
``post_layernorm``, so only the first ``feature_layer_index`` layers are run; later layers and
``post_layernorm`` are held as parameters (for lossless checkpoint round trips) but never executed.

Each layer can also hand back its queries and keys so that reducers read CLS->patch attention or
key similarities at any layer without a second pass (:class:`VisionTaps`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.config import VisionConfig
from jaxprune.models.attention import attention, attention_rows
from jaxprune.models.layers import Embed, LayerNorm, Linear, activation


@dataclasses.dataclass(frozen=True)
class VisionTap:
    """What a reducer may read at one CLIP layer (all from the same forward pass)."""

    hidden: jax.Array        # [B, 1+N, D] output of the layer (CLS first)
    cls_attn: jax.Array      # [B, heads, 1+N] softmax attention of the CLS query in this layer
    keys: jax.Array          # [B, 1+N, heads, head_dim] keys of this layer (pre-softmax, biased)


jax.tree_util.register_dataclass(VisionTap, data_fields=["hidden", "cls_attn", "keys"], meta_fields=[])


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, C, D = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.kernel = nnx.Param((0.02 * jax.random.normal(rngs.params(), (p, p, C, D))).astype(param_dtype))
        self.patch = p
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, N, D]
        B, C, Hh, Ww = pixels.shape
        p = self.patch
        x = pixels.astype(self.dtype).reshape(B, C, Hh // p, p, Ww // p, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(B, (Hh // p) * (Ww // p), p * p * C)  # (kh, kw, c) order
        w = self.kernel[...].astype(self.dtype).reshape(p * p * C, -1)
        return x @ w


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(D, D, **kw)
        self.k_proj = Linear(D, D, **kw)
        self.v_proj = Linear(D, D, **kw)
        self.out_proj = Linear(D, D, **kw)
        self.heads = cfg.num_attention_heads

    def __call__(self, x: jax.Array, mask: jax.Array | None):  # [B, S, D]
        B, S, D = x.shape
        shp = (B, S, self.heads, D // self.heads)
        q = self.q_proj(x).reshape(shp)
        k = self.k_proj(x).reshape(shp)
        v = self.v_proj(x).reshape(shp)
        o = attention(q, k, v, mask)
        return self.out_proj(o.reshape(B, S, D)), q, k


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(cfg, rngs=rngs, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, rngs=rngs, **kw)

    def __call__(self, h: jax.Array, mask: jax.Array | None = None):  # [B, S, D]
        a, q, k = self.self_attn(self.layer_norm1(h), mask)
        h = h + a
        h = h + self.mlp(self.layer_norm2(h))
        return h, q, k


class CLIPVision(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.class_embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (D,))).astype(param_dtype))
        self.patch_embedding = PatchEmbed(cfg, rngs=rngs, **kw)
        self.position_embedding = Embed(cfg.num_patches + 1, D, rngs=rngs, **kw)
        self.pre_layrnorm = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
        self.layers = nnx.List([CLIPLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
        self.dtype = dtype

    def embed(self, pixels: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, 1+N, D]
        x = self.patch_embedding(pixels)
        B = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (B, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding.embedding[...].astype(self.dtype)[None]
        return self.pre_layrnorm(x)

    def __call__(self, pixels: jax.Array, num_layers: int, taps: tuple[int, ...] = ()
                 ) -> tuple[jax.Array, dict[int, VisionTap]]:
        """Run ``num_layers`` encoder layers; ``hidden_states[num_layers]`` in HF's indexing.

        ``taps``: HF hidden-state indices (1..num_layers) at which to record a :class:`VisionTap`.
        Returns ``(hidden [B, 1+N, D], {index: VisionTap})``.
        """
        h = self.embed(pixels)
        out: dict[int, VisionTap] = {}
        for i in range(num_layers):
            h, q, k = self.run(h, i, i + 1)
            if (i + 1) in taps:
                valid = jnp.ones(k.shape[:2], bool)
                cls_attn = attention_rows(q[:, :1], k, valid)[:, :, 0, :]  # [B, heads, 1+N]
                out[i + 1] = VisionTap(hidden=h, cls_attn=cls_attn, keys=k)
        return h, out

    def run(self, h: jax.Array, start: int, stop: int, valid: jax.Array | None = None):
        """Encoder layers ``[start, stop)`` on ``h [B, S, D]`` (key mask ``valid [B, S]``; None: every token):
        the one layer loop of the tower. Returns ``(h, q, k)`` with the last layer's queries / keys."""
        mask = None if valid is None else valid[:, None, None, :]
        q = k = None
        for i in range(start, stop):
            h, q, k = self.layers[i](h, mask)
        return h, q, k
