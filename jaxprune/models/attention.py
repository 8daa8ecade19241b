"""Attention: RoPE (HF ``rotate_half`` layout), masks, the fused main path, and cheap score rows.

The main path is ``jax.nn.dot_product_attention`` (XLA on CPU/TPU, cuDNN flash on GPU where dtype
and shapes allow). Layout is BTNH for queries and BSKH for keys/values; GQA is native.
Methods that need attention *probabilities* recompute only the query rows they use
(:func:`attention_rows`), never a full S x S matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, head_dim]`` in fp32 for integer ``positions [B, T]`` (HF default RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, T, N, H]``, tables ``[B, T, H]``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Boolean mask ``[B, 1, T, S]``: key slot ``s`` visible to query ``t`` iff ``k_pos <= q_pos`` and valid.

    ``q_pos [B, T]`` and ``k_pos [B, S]`` are *slot orders* (monotone in the sequence), not RoPE
    positions, so pruned sequences that keep original positions still mask correctly.
    """
    m = (k_pos[:, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
    return m[:, None, :, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              implementation: str | None = None, causal: bool = False) -> jax.Array:
    """Scaled-dot-product attention. ``q [B,T,N,H]``, ``k/v [B,S,K,H]``, mask ``[B,1,T,S]`` or ``[B,1,1,S]``.

    ``causal``: a promise that ``mask`` already hides every key slot after the query's slot (``T == S``, slot
    order; what :func:`causal_mask` builds for a prefill). It changes no result: it lets an implementation skip
    the key blocks above the diagonal (the CPU path below; cuDNN's causal mode on GPU).

    GPU/TPU: ``jax.nn.dot_product_attention`` (``implementation`` passed through; ``None`` lets XLA pick,
    ``'cudnn'`` forces flash). CPU: :func:`attention_cpu`. Softmax is fp32 everywhere; fully masked rows give
    finite, ignored output.
    """
    if implementation is None and jax.default_backend() == "cpu":
        return attention_cpu(q, k, v, mask, causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                        is_causal=causal and q.shape[1] == k.shape[1])


#: CPU schedule sizes: query rows per block of the query-block schedule, key slots per block of the non-causal
#: flash loop, the shortest sequence that leaves the one-pass schedule, the ``T * S`` above which an attention
#: (causal or not) takes a flash loop instead of query blocks, and the largest block of the causal flash
#: schedule (measured on 2 Xeon / EPYC cores, 8 heads of 64, fp32: ``experiments/results/stages_cpu.md``,
#: ``stages_cpu_epyc.md``).
CPU_Q_BLOCK, CPU_K_BLOCK, CPU_BLOCKED_MIN_T, CPU_LOOP_MIN_TS, CPU_CAUSAL_BLOCK = 128, 256, 256, 1024 * 1024, 256


CPU_SCHEDULES = ("dense", "qblocks", "flash")


def causal_block(T: int) -> int:
    """Block of the causal flash schedule: about a third of ``T`` (in multiples of 32), at most
    ``CPU_CAUSAL_BLOCK`` (672 tokens -> 224, 3008 -> 256)."""
    return max(32, min(CPU_CAUSAL_BLOCK, -(-(-(-T // 3)) // 32) * 32))


def attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, causal: bool = False,
                  schedule: str | None = None) -> jax.Array:
    """Attention scheduled for XLA:CPU; ``schedule`` (one of :data:`CPU_SCHEDULES`, for benchmarks) or, by
    default, chosen by the static shapes:

    * ``T < CPU_BLOCKED_MIN_T`` (decode steps, short prompts): one einsum pass (:func:`_dense_cpu`);
    * ``T * S <= CPU_LOOP_MIN_TS`` (up to 1024 x 1024; LLaVA-1.5's 672-token prefill, CLIP): static query blocks
      of ``CPU_Q_BLOCK`` rows, each a head-major einsum + softmax over the keys it may see (causal: the keys
      before the block's end) (:func:`_qblocks_cpu`). At 672 causal tokens it takes 6.8 ms per layer against
      10.6 ms for the flash loop below (2 EPYC cores; 11.7 vs 16.4 ms on 2 Xeon cores:
      ``experiments/results/stages_cpu_epyc.md``, ``stages_cpu.md``): the loop's body runs on one thread;
    * a longer causal prefill (``causal`` and ``T == S``; NeXT's 3008 tokens): flash attention on
      square blocks of :func:`causal_block` rows (:func:`_causal_flash_cpu`): a loop over query blocks, each an
      online softmax over the key blocks strictly below the diagonal (key validity as an additive bias, no
      mask) and then its diagonal block (the one masked block); the blocks above the diagonal are never
      computed and the ``T x S`` scores never materialised;
    * a longer non-causal one (every query sees every valid key): a flash loop over key blocks
      (:func:`_flash_cpu`).

    ``causal`` promises that ``mask`` is a causal prefill mask as :func:`causal_mask` builds it (``mask[b, 0, t,
    s] = s <= t and key_valid[b, s]``): the causal schedule reads the key validity from the mask's last row.

    Why: XLA:CPU materialises the whole ``[B, heads, T, S]`` fp32 score tensor of a one-pass attention (290 MB
    per layer at T = 3008) and runs the ``p @ v`` einsum in a batch-minor layout at ~20 GFLOP/s; at T = 3008 that
    took 0.9-1.4 s per layer against 0.05-0.11 s for PyTorch's SDPA (flash, causal) on the same two cores: the
    product half of issue 19 (the 8x-21x full-model rows of ``bench_gpu``'s CPU stand-in)."""
    T, S = q.shape[1], k.shape[1]
    causal = causal and T == S
    if schedule is None:
        schedule = "dense" if T < CPU_BLOCKED_MIN_T else "flash" if T * S > CPU_LOOP_MIN_TS else "qblocks"
    if schedule not in CPU_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {CPU_SCHEDULES}")
    if schedule == "dense":
        return _dense_cpu(q, k, v, mask)
    if schedule == "qblocks":
        return _qblocks_cpu(q, k, v, mask, causal, CPU_Q_BLOCK)
    if causal:
        return _causal_flash_cpu(q, k, v, None if mask is None else mask[:, 0, -1, :], causal_block(T))
    return _flash_cpu(q, k, v, mask, causal, CPU_Q_BLOCK * 2, CPU_K_BLOCK)


def _causal_flash_cpu(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, b: int) -> jax.Array:
    """Causal self-attention (``T == S``) on square ``b x b`` blocks; ``key_valid [B, S]`` (None: all valid).

    Batch and key/value heads are merged into one batch dimension, a block's query rows are ``(t, g)`` pairs
    (GQA: the ``G`` query heads of a key/value head share its keys), so each block is two plain batched GEMMs."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    n = -(-T // b)
    pad = n * b - T
    qh = (q * jnp.asarray(1.0 / float(H) ** 0.5, q.dtype)).reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))).reshape(B * K, n * b * G, H)
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B * K, n * b, H)
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B * K, n * b, H)
    kv = jnp.ones((B, T), bool) if key_valid is None else key_valid
    bias = jnp.repeat(jnp.where(jnp.pad(kv, ((0, 0), (0, pad))), 0.0, _NEG).astype(jnp.float32), K, axis=0)
    tri = jnp.repeat(jnp.arange(b)[None, :] <= jnp.arange(b)[:, None], G, axis=0)  # [(t, g), s] within a block

    def q_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qh, i * b * G, b * G, axis=1)  # [B*K, b*G, H]

        def step(j, carry, diagonal=False):
            m, l, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(kh, j * b, b, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(vh, j * b, b, axis=1)
            sc = jnp.einsum("bth,bsh->bts", qb, kb, preferred_element_type=jnp.float32)
            sc = sc + jax.lax.dynamic_slice_in_dim(bias, j * b, b, axis=1)[:, None, :]
            if diagonal:
                sc = jnp.where(tri[None], sc, _NEG)
            m2 = jnp.maximum(m, sc.max(-1, keepdims=True))
            a, p = jnp.exp(m - m2), jnp.exp(sc - m2)
            pv = jnp.einsum("bts,bsh->bth", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return m2, l * a + p.sum(-1, keepdims=True), acc * a + pv

        init = (jnp.full((B * K, b * G, 1), _NEG, jnp.float32), jnp.zeros((B * K, b * G, 1), jnp.float32),
                jnp.zeros((B * K, b * G, H), jnp.float32))
        _, l, acc = step(i, jax.lax.fori_loop(0, i, step, init), diagonal=True)
        return acc / l

    o = jax.lax.map(q_block, jnp.arange(n))  # [n, B*K, b*G, H]
    o = o.reshape(n, B, K, b, G, H).transpose(1, 0, 3, 2, 4, 5).reshape(B, n * b, N, H)[:, :T]
    return o.astype(q.dtype)


def _dense_cpu(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Plain einsum attention with optimisation barriers around the softmax (decode steps, short sequences).

    XLA:CPU otherwise fuses the mask/softmax into the matmul consumers as scalar loops; the barriers keep the
    two matmuls as library GEMMs.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = jax.lax.optimization_barrier(s * (1.0 / float(H) ** 0.5))
    if mask is not None:
        s = jnp.where(_mask5(mask, K, N // K), s, _NEG)
    p = jax.lax.optimization_barrier(jax.nn.softmax(s, axis=-1).astype(v.dtype))
    o = jnp.einsum("bkgts,bskh->btkgh", p, v)
    return o.reshape(B, T, N, H)


_NEG = float(jnp.finfo(jnp.float32).min)


def _mask5(mask: jax.Array, K: int, G: int) -> jax.Array:
    """``[B, 1|N, 1|T, S]`` -> broadcastable ``[B, 1|K, 1|G, 1|T, S]``."""
    B, mh, mt, S = mask.shape
    return mask.reshape(B, 1, 1, mt, S) if mh == 1 else mask.reshape(B, K, G, mt, S)


def _head_major(q, k, v):
    """``q [B,T,N,H]`` -> ``[B,K,G,T,H]`` scaled by 1/sqrt(H); ``k, v [B,S,K,H]`` -> ``[B,K,S,H]``."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qh = (q * jnp.asarray(1.0 / float(H) ** 0.5, q.dtype)).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _from_head_major(o: jax.Array, dtype) -> jax.Array:
    """``[B,K,G,T,H]`` -> ``[B,T,K*G,H]``."""
    B, K, G, T, H = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H).astype(dtype)


def _qblocks_cpu(q, k, v, mask, causal: bool, bq: int) -> jax.Array:
    """Static query blocks; each one softmax over the keys it may see (causal: ``[0, block end)``)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qh, kh, vh = _head_major(q, k, v)
    m5 = None if mask is None else _mask5(mask, K, G)
    outs = []
    for s0 in range(0, T, bq):
        s1 = min(T, s0 + bq)
        e = s1 if causal else S
        sc = jnp.einsum("bkgth,bksh->bkgts", qh[:, :, :, s0:s1], kh[:, :, :e], preferred_element_type=jnp.float32)
        if m5 is not None:
            sc = jnp.where(m5[..., s0:s1, :e] if m5.shape[3] > 1 else m5[..., :e], sc, _NEG)
        p = jax.nn.softmax(sc, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", p, vh[:, :, :e]))
    return _from_head_major(jnp.concatenate(outs, axis=3), q.dtype)


def _flash_cpu(q, k, v, mask, causal: bool, bq: int, bk: int) -> jax.Array:
    """Flash attention: ``lax.map`` over query blocks, ``fori_loop`` over key blocks with an online softmax
    (running max / sum in fp32); causal: only key blocks that start at or before the query block's last row."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk
    qh, kh, vh = _head_major(q, k, v)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    kh = jnp.pad(kh, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    vh = jnp.pad(vh, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    if mask is None:
        mask = jnp.ones((B, 1, 1, S), bool)
    per_q = mask.shape[2] > 1
    mp = _mask5(jnp.pad(mask, ((0, 0), (0, 0), (0, Tp - T if per_q else 0), (0, Sp - S))), K, G)  # pad = hidden

    def q_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qh, i * bq, bq, axis=3)
        mq = jax.lax.dynamic_slice_in_dim(mp, i * bq, bq, axis=3) if per_q else mp

        def k_block(j, carry):
            m, l, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, axis=2)
            mb = jax.lax.dynamic_slice_in_dim(mq, j * bk, bk, axis=4)
            sc = jnp.einsum("bkgth,bksh->bkgts", qb, kb, preferred_element_type=jnp.float32)
            sc = jnp.where(mb, sc, _NEG)
            m2 = jnp.maximum(m, sc.max(-1, keepdims=True))
            a, p = jnp.exp(m - m2), jnp.exp(sc - m2)
            pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return m2, l * a + p.sum(-1, keepdims=True), acc * a + pv

        init = (jnp.full((B, K, G, bq, 1), _NEG, jnp.float32), jnp.zeros((B, K, G, bq, 1), jnp.float32),
                jnp.zeros((B, K, G, bq, H), jnp.float32))
        stop = jnp.minimum(((i + 1) * bq + bk - 1) // bk, nk) if causal else nk
        _, l, acc = jax.lax.fori_loop(0, stop, k_block, init)
        return acc / l

    o = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, H]
    o = o.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tp, H)[:, :, :, :T]
    return _from_head_major(o, q.dtype)


def attention_rows(q_rows: jax.Array, k: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Softmax attention probabilities of a few query rows: ``q_rows [B,R,N,H]``, ``k [B,S,K,H]``.

    ``key_valid`` is ``[B, S]`` (same keys for every row) or ``[B, R, S]`` (per row, e.g. causal).
    Returns ``[B, N, R, S]`` fp32, exact (softmax over the full valid key row), O(R*S) work.
    """
    B, R, N, H = q_rows.shape
    K = k.shape[2]
    qg = q_rows.reshape(B, R, K, N // K, H).astype(jnp.float32)
    logits = jnp.einsum("brkgh,bskh->bkgrs", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(H))
    logits = logits.reshape(B, N, R, -1)
    kv = key_valid[:, None, None, :] if key_valid.ndim == 2 else key_valid[:, None, :, :]
    logits = jnp.where(kv, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
