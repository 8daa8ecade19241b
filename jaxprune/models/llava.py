"""LLaVA assembly: CLIP tower -> 2-layer projector -> visual tokens scattered into the Llama input.

Inputs follow the HF processor convention: ``input_ids`` hold one ``image_token_index`` per visual
token, images in reading order across the (flattened) batch, exactly as HF's ``masked_scatter``.
Image-token ids are replaced by 0 before the embedding lookup (HF does the same), so the image
token may lie outside the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.config import LlavaConfig
from jaxprune.models.clip import CLIPVision, VisionTap
from jaxprune.models.layers import Linear, activation
from jaxprune.models.llama import LlamaModel
from jaxprune.models.siglip import SiglipVision


class Projector(nnx.Module):
    """``linear_2(act(linear_1(x)))``; LLaVA's ``mlp2x_gelu`` (exact erf GELU)."""

    def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(cfg.vision.hidden_size, cfg.text.hidden_size, **kw)
        self.linear_2 = Linear(cfg.text.hidden_size, cfg.text.hidden_size, **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., Dv] -> [..., H]
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModule(nnx.Module):
    """Parameter holder for a whole LLaVA model; state paths match :func:`param_spec.param_shapes`."""

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        if cfg.model_type == "video_llava":  # two towers of one config (HF: image_tower, video_tower)
            self.image_tower = CLIPVision(cfg.vision, rngs=rngs, **kw)
            self.video_tower = CLIPVision(cfg.vision, rngs=rngs, **kw)
        elif cfg.vision.kind == "siglip":
            self.vision = SiglipVision(cfg.vision, rngs=rngs, **kw)
        else:
            self.vision = CLIPVision(cfg.vision, rngs=rngs, **kw)
        self.projector = Projector(cfg, rngs=rngs, **kw)
        self.language = LlamaModel(cfg.text, rngs=rngs, **kw)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, rngs=rngs, **kw)
        else:
            self.lm_head = None
        if cfg.model_type in ("llava_next", "llava_onevision"):
            self.image_newline = nnx.Param(
                (jax.random.normal(rngs.params(), (cfg.text.hidden_size,)) / cfg.text.hidden_size ** 0.5
                 ).astype(param_dtype))

    # ---- vision side ---------------------------------------------------------------------------
    def tower(self, kind: str = "image") -> CLIPVision | SiglipVision:
        """The CLIP tower that encodes ``kind`` ("image" or "video"); one-tower families have one for both."""
        if self.cfg.model_type == "video_llava":
            return self.video_tower if kind == "video" else self.image_tower
        return self.vision

    def vision_features(self, pixels: jax.Array, taps: tuple[int, ...] = ()
                        ) -> tuple[jax.Array, dict[int, VisionTap]]:
        """CLIP features at ``vision_feature_layer`` with the select strategy applied.

        ``pixels [N, C, S, S]`` -> ``([N, P, Dv], taps)`` with P = 576 for CLIP-L/336 ('default').
        """
        h, tapped = self.tower()(pixels, self.cfg.feature_layer_index, taps)
        if self.cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return h, tapped

    def image_features(self, pixels: jax.Array) -> jax.Array:  # [N, C, S, S] -> [N, P, H]
        return self.projector(self.vision_features(pixels)[0])

    # ---- text side -----------------------------------------------------------------------------
    def embed_text(self, input_ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, H]
        ids = jnp.where(input_ids == self.cfg.image_token_index, 0, input_ids)
        if self.cfg.video_token_index is not None:
            ids = jnp.where(ids == self.cfg.video_token_index, 0, ids)
        return self.language.embed_tokens(ids)

    def merge(self, input_ids: jax.Array, feats: jax.Array) -> jax.Array:
        """Scatter ``feats [N, P, H]`` into the image-token slots of ``input_ids [B, T]`` (reading order)."""
        emb = self.embed_text(input_ids)  # [B, T, H]
        is_img = (input_ids == self.cfg.image_token_index).reshape(-1)  # [B*T]
        flat = feats.reshape(-1, feats.shape[-1]).astype(emb.dtype)  # [N*P, H]
        idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, max(flat.shape[0] - 1, 0))
        vals = jnp.take(flat, idx, axis=0).reshape(emb.shape)
        return jnp.where(is_img.reshape(input_ids.shape)[..., None], vals, emb)

    def logits(self, h: jax.Array) -> jax.Array:  # [B, T, H] -> [B, T, V] (fp32)
        h = self.language.norm(h)
        if self.lm_head is not None:
            return self.lm_head(h).astype(jnp.float32)
        w = self.language.embed_tokens.embedding[...].astype(h.dtype)
        return jnp.einsum("bth,vh->btv", h, w).astype(jnp.float32)
