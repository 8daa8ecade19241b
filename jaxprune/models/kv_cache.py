"""Static KV cache: one ``(k, v)`` pair per decoder layer, each ``[B, S_cap, K, H]``.

Layers may own caches of different capacity: after an in-LLM cut the later layers hold a smaller
static cache (the memory saving is real, not a mask over a full-size buffer). Which slots hold a
token is tracked per segment by a ``valid [B, S_cap]`` mask and the slots' RoPE positions, kept
by the caller (see :mod:`jaxprune.engine.decoder`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [B, S_cap, K, H]
    v: jax.Array  # [B, S_cap, K, H]

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize


jax.tree_util.register_dataclass(LayerCache, data_fields=["k", "v"], meta_fields=[])


def prefill_cache(k: jax.Array, v: jax.Array, capacity: int) -> LayerCache:
    """Cache of ``capacity`` slots whose first ``T`` slots hold ``k, v [B, T, K, H]``; the rest are zeros."""
    B, T, K, H = k.shape
    if capacity < T:
        raise ValueError(f"cache capacity {capacity} is smaller than the prefill length {T}")
    pad = ((0, 0), (0, capacity - T), (0, 0), (0, 0))
    return LayerCache(jnp.pad(k, pad), jnp.pad(v, pad))


def write(cache: LayerCache, k: jax.Array, v: jax.Array, slot: jax.Array) -> LayerCache:
    """Write one step ``k, v [B, 1, K, H]`` at the (shared, traced) slot index."""
    z = jnp.zeros((), jnp.int32)
    return LayerCache(
        jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (z, slot, z, z)),
        jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (z, slot, z, z)),
    )


def cache_bytes(batch: int, capacities: list[int], kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Analytic KV-cache size: sum over layers of ``2 * B * S_cap * K * H * itemsize``."""
    return sum(2 * batch * c * kv_heads * head_dim * itemsize for c in capacities)
