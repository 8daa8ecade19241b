"""Llama decoder (HF ``LlamaModel``): RMSNorm, RoPE (rotate_half), GQA, SwiGLU, static KV cache. Qwen2 (HF
``Qwen2Model``, full attention) is the same decoder with biased q / k / v projections (``TextConfig.qkv_bias``).

The decoder is written as per-layer calls so that callers can run it in *segments* (layers
``[a, b)``) with a different static sequence length and cache size per segment; in-LLM reducers
cut between segments. Positions given to RoPE are explicit (``positions [B, T]``) so a pruned
sequence can keep its original positions or be renumbered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.config import TextConfig
from jaxprune.models import kv_cache
from jaxprune.models.attention import apply_rope, attention, rope_cos_sin
from jaxprune.models.layers import Embed, Linear, RMSNorm


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        H, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv = dict(bias=cfg.qkv_bias, **kw)  # Qwen2: biased q / k / v, never o_proj
        self.q_proj = Linear(H, cfg.num_attention_heads * hd, **qkv)
        self.k_proj = Linear(H, cfg.num_key_value_heads * hd, **qkv)
        self.v_proj = Linear(H, cfg.num_key_value_heads * hd, **qkv)
        self.o_proj = Linear(cfg.num_attention_heads * hd, H, bias=False, **kw)
        self.n, self.kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):  # x [B, T, H]
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(B, T, self.n, self.hd), cos, sin)  # [B, T, N, hd]
        k = apply_rope(self.k_proj(x).reshape(B, T, self.kv, self.hd), cos, sin)  # [B, T, K, hd]
        v = self.v_proj(x).reshape(B, T, self.kv, self.hd)
        return q, k, v

    def out(self, o: jax.Array) -> jax.Array:  # [B, T, N, hd] -> [B, T, H]
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, self.n * self.hd))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs, **kw)

    def prefill(self, h: jax.Array, cos, sin, mask: jax.Array, capacity: int):
        """Full-sequence step. ``h [B, T, H]``, ``mask [B, 1, T, T]``, causal in slot order (:func:`causal_mask`:
        attention may skip the key blocks above the diagonal).

        Returns ``(h, cache, (q, k))`` with this layer's post-RoPE ``q [B,T,N,hd]``, ``k [B,T,K,hd]``.
        """
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        h = h + self.self_attn.out(attention(q, k, v, mask, causal=True))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (kv_cache.prefill_cache(k, v, capacity) if capacity else None), (q, k)

    def decode(self, h: jax.Array, cos, sin, cache: kv_cache.LayerCache, slot: jax.Array, mask: jax.Array):
        """One new token per row. ``h [B, 1, H]``, ``mask [B, 1, 1, S_cap]`` (already includes ``slot``)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        cache = kv_cache.write(cache, k, v, slot)
        h = h + self.self_attn.out(attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, cache


class LlamaModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List([LlamaLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def rope(self, positions: jax.Array):  # [B, T] -> cos, sin [B, T, hd]
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
