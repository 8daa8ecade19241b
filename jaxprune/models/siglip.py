"""SigLIP ViT vision tower as LLaVA-OneVision uses it (HF ``SiglipVisionModel``, ``vision_use_head=False``).

Differences from CLIP (:mod:`jaxprune.models.clip`): no class token, a *biased* stride-p patch convolution with
``padding="valid"`` (a 384 px crop at patch 14 gives 27 x 27 = 729 patches; the last 6 pixel rows / columns are
never read), one learned position per patch, no pre-norm, ``gelu_pytorch_tanh`` MLPs, ``layer_norm_eps`` 1e-6.
The encoder layers are CLIP's (pre-LN, biased q/k/v/out projections). HF's ``SiglipVisionModel`` records
``hidden_states`` *before* ``post_layernorm`` (``capture_outputs(tie_last_hidden_states=False)``), so
``vision_feature_layer=-1`` reads the last encoder layer's output without the post-norm: ``post_layernorm`` is held
as a parameter (lossless round trips) and never run, as on CLIP.

Same interface as :class:`~jaxprune.models.clip.CLIPVision` (``embed`` / ``run`` / ``__call__``), so the one vision
loop (:func:`jaxprune.models.tower.clip_segment`) runs either tower; token 0 is a patch here, not a CLS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.config import VisionConfig
from jaxprune.models.clip import CLIPLayer, PatchEmbed
from jaxprune.models.layers import Embed, LayerNorm


class SiglipPatchEmbed(PatchEmbed):
    """Conv2d(C, D, p, stride p, padding 'valid', bias) as one matmul over the ``grid x grid`` whole patches."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), param_dtype))
        self.grid = cfg.grid

    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, g*g, D]
        side = self.grid * self.patch
        x = super().__call__(pixels[:, :, :side, :side])  # 'valid': trailing pixels are never read
        return x + self.bias[...].astype(self.dtype)


class SiglipVision(nnx.Module):
    """Parameter holder + forward of the SigLIP tower (state names match :mod:`jaxprune.models.param_spec`)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.patch_embedding = SiglipPatchEmbed(cfg, rngs=rngs, **kw)
        self.position_embedding = Embed(cfg.num_patches, D, rngs=rngs, **kw)
        self.layers = nnx.List([CLIPLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = LayerNorm(D, eps=cfg.layer_norm_eps, **kw)
        self.dtype = dtype

    def embed(self, pixels: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, N, D]
        """Patch embeddings plus positions (no class token, no pre-norm)."""
        x = self.patch_embedding(pixels)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]

    def __call__(self, pixels: jax.Array, num_layers: int, taps: tuple[int, ...] = ()) -> tuple[jax.Array, dict]:
        """``(hidden_states[num_layers] [B, N, D], {})`` in HF's indexing (no post-norm); CLIP's interface.
        ``taps`` (CLS-attention records) do not exist on a tower without a class token."""
        if taps:
            raise ValueError("SigLIP has no class token: CLS-attention taps are not available")
        return self.run(self.embed(pixels), 0, num_layers)[0], {}

    def run(self, h: jax.Array, start: int, stop: int, valid: jax.Array | None = None):
        """Encoder layers ``[start, stop)`` on ``h [B, S, D]`` (key mask ``valid [B, S]``). Returns ``(h, q, k)``
        with the last layer's queries / keys ``[B, S, heads, hd]``."""
        mask = None if valid is None else valid[:, None, None, :]
        q = k = None
        for i in range(start, stop):
            h, q, k = self.layers[i](h, mask)
        return h, q, k
