"""Small NNX parameter holders (dense, norms, embedding) with HF-exact numerics.

Parameters are stored in ``param_dtype``; compute happens in ``dtype`` except norms, which run in
fp32 and cast back (as HF ``LlamaRMSNorm`` / ``nn.LayerNorm`` under autocast do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``[in, out]`` (the transpose of torch's ``nn.Linear.weight``)."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm`` (biased variance), computed in fp32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        h = x.astype(jnp.float32)
        mu = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + self.eps)
        h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm``: fp32 statistics, ``weight * h.to(input_dtype)``."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * h.astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table ``[rows, D]`` (not transposed w.r.t. torch)."""

    def __init__(self, rows: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (rows, dim), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:  # [...] int -> [..., D]
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def activation(name: str):
    """The HF activation called ``name`` (exact erf GELU for ``gelu``, as HF's ``GELUActivation``)."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")
