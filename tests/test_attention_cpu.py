"""The CPU attention schedules (one pass, static query blocks, flash loop) == a plain softmax reference, for
causal prefill masks with padding (left and right), key-only masks, no mask, GQA and per-head masks; the
``causal`` promise changes no result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import attention as A


def reference(q, k, v, mask):
    """fp64 NumPy softmax attention (fully masked rows: not compared)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    kr, vr = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(H)
    if mask is not None:
        s = np.where(np.broadcast_to(np.asarray(mask), s.shape), s, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked rows: nan, never compared
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, vr)


def inputs(B, T, S, N, K, H, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, N, H)).astype(np.float32), rng.standard_normal((B, S, K, H)).astype(np.float32),
            rng.standard_normal((B, S, K, H)).astype(np.float32))


def causal(valid):
    slots = jnp.broadcast_to(jnp.arange(valid.shape[1])[None], valid.shape)
    return A.causal_mask(slots, slots, jnp.asarray(valid))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that short sequences take every schedule (incl. ragged last blocks)."""
    monkeypatch.setattr(A, "CPU_Q_BLOCK", 16)
    monkeypatch.setattr(A, "CPU_K_BLOCK", 24)
    monkeypatch.setattr(A, "CPU_CAUSAL_BLOCK", 24)
    monkeypatch.setattr(A, "CPU_BLOCKED_MIN_T", 32)
    monkeypatch.setattr(A, "CPU_LOOP_MIN_TS", 100 * 100)


@pytest.mark.parametrize("T", [20, 70, 150])
@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("schedule", [None, *A.CPU_SCHEDULES])
def test_causal_prefill_every_schedule(small_blocks, T, pad, schedule):
    """A causal prefill mask (GQA, padded rows): every schedule, with and without the causal promise."""
    q, k, v = inputs(2, T, T, 4, 2, 8)  # GQA: 4 query heads on 2 key/value heads
    valid = np.ones((2, T), bool)
    if pad == "right":
        valid[1, T - 5:] = False
    else:
        valid[1, :5] = False
    mask = causal(valid)
    want = reference(q, k, v, mask)
    rows = np.asarray(mask).any(-1)[:, 0]  # queries with at least one visible key
    for flag in (False, True):
        got = np.asarray(jax.jit(lambda *a, c=flag: A.attention_cpu(*a, c, schedule))(q, k, v, mask))
        np.testing.assert_allclose(got[rows], want[rows], rtol=2e-5, atol=2e-5)
        assert np.isfinite(got).all()


@pytest.mark.parametrize("T", [20, 70, 150])
def test_key_mask_and_no_mask(small_blocks, T):
    """CLIP's calls: a key-validity mask ``[B, 1, 1, S]`` (or none), every query sees every valid key."""
    q, k, v = inputs(3, T, T, 4, 4, 8, seed=1)
    valid = np.ones((3, T), bool)
    valid[2, T // 2:] = False
    mask = jnp.asarray(valid)[:, None, None, :]
    for m in (mask, None):
        for schedule in (None, *A.CPU_SCHEDULES):
            np.testing.assert_allclose(np.asarray(A.attention_cpu(q, k, v, m, False, schedule)),
                                       reference(q, k, v, m), rtol=2e-5, atol=2e-5)


def test_per_head_mask_and_cross_lengths(small_blocks):
    """A ``[B, N, T, S]`` mask and ``T != S`` (decode-style queries against a longer cache): never causal."""
    q, k, v = inputs(1, 40, 90, 4, 2, 8, seed=2)
    mask = jnp.asarray(np.random.default_rng(3).random((1, 4, 40, 90)) < 0.7)
    want = reference(q, k, v, mask)
    for flag in (False, True):  # causal=True with T != S is ignored
        for schedule in (None, *A.CPU_SCHEDULES):
            np.testing.assert_allclose(np.asarray(A.attention_cpu(q, k, v, mask, flag, schedule)), want, rtol=2e-5,
                                       atol=2e-5)


def test_causal_block_sizes():
    assert [A.causal_block(t) for t in (300, 672, 1024, 3008)] == [128, 224, 256, 256]


def test_default_sizes_pick_the_schedules(monkeypatch):
    """The production thresholds: a decode step stays one pass, LLaVA-1.5's 672-token causal prefill and CLIP's 577
    tokens take query blocks, NeXT's 3008-token causal prefill the causal flash schedule, a long non-causal call
    the flash loop (checked on the traced program, nothing run)."""
    seen = []
    for name in ("_dense_cpu", "_qblocks_cpu", "_flash_cpu", "_causal_flash_cpu"):
        real = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    for T, S, c in ((1, 700, True), (672, 672, True), (3008, 3008, True), (577, 577, False), (3008, 3008, False)):
        q = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, S, 8, 64), jnp.float32)
        jax.eval_shape(lambda q, k, v: A.attention_cpu(q, k, v, None, c), q, kv, kv)
    assert seen == ["_dense_cpu", "_qblocks_cpu", "_causal_flash_cpu", "_qblocks_cpu", "_flash_cpu"]
