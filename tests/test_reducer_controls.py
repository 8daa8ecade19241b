"""Control reducers (random, uniform, pooling) == plain NumPy; batching, traces, end to end, budgets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers._core import uniform_indices
from jaxprune.reducers.controls import Pool, RandomPrune, Uniform, pool, pool2x2, random_prune, uniform
from tests.reducer_testlib import (E2E_BUDGETS, assert_batched_equals_rows, assert_no_callbacks, assert_one_trace,
                                   check_end_to_end, random_projector_context)

P = 144
N_VALID = [144, 10, 50, 3]


# ----------------------------------------------------------------------------- NumPy references
@functools.cache
def _uniform_scores(seed: int, row: int, p: int) -> np.ndarray:
    return np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), row), (p,)))


def ref_random(valid: np.ndarray, k: int, seed: int, row: int):
    """torch.rand-style baseline: U[0,1) scores from key fold_in(key(seed), row) -> top-k valid -> sort."""
    u = _uniform_scores(seed, row, valid.size)
    pos = np.flatnonzero(valid)
    top = np.sort(pos[np.argsort(-u[pos], kind="stable")[:k]])  # highest scores, ties to the lower index
    fill = np.flatnonzero(~valid)[: k - len(top)]  # unfillable slots: lowest-index invalid tokens
    return np.concatenate([top, fill]).astype(int), np.arange(k) < len(top)


def ref_uniform(valid: np.ndarray, k: int, rule: str):
    pos = np.flatnonzero(valid)
    if len(pos) >= k:
        return pos[uniform_indices(len(pos), k, rule)], np.ones(k, bool)
    rest = np.flatnonzero(~valid)[: k - len(pos)]
    return np.concatenate([pos, rest]), np.arange(k) < len(pos)


def ref_pool(feats: np.ndarray, valid: np.ndarray, g: int, win: int):
    """Masked mean over each win x win block (raster order); index = first valid token of the block."""
    toks, idx, ok = [], [], []
    for r in range(0, g, win):
        for c in range(0, g, win):
            block = [(r + i) * g + (c + j) for i in range(win) for j in range(win)]
            vb = [t for t in block if valid[t]]
            toks.append(feats[vb].mean(0) if vb else np.zeros(feats.shape[1], feats.dtype))
            idx.append(vb[0] if vb else block[0])
            ok.append(bool(vb))
    return np.array(idx), np.stack(toks), np.array(ok)


# ----------------------------------------------------------------------------- random
@pytest.mark.parametrize("k", [1, 48, 143])
def test_random_matches_reference(k):
    r = jax.jit(RandomPrune(k, seed=7))
    for seed in range(50):
        ctx = random_projector_context(2, seed=seed)
        out = r(ctx)
        for row in range(2):
            idx, ok = ref_random(np.asarray(ctx.valid[row]), k, 7, row)
            np.testing.assert_array_equal(np.asarray(out.index[row]), idx)
            np.testing.assert_array_equal(np.asarray(out.valid[row]), ok)
            np.testing.assert_allclose(np.asarray(out.tokens[row]), np.asarray(ctx.features[row])[idx], atol=1e-6)


def test_random_rows_seeds_and_masks():
    """Row i of a batch == the reference for row index i (the key folds the row in); a row's picks depend
    on its index and validity only, not on the other rows' content. (So "batched == each row alone"
    holds only for row 0: a row alone has index 0 -- documented.)"""
    ctx = random_projector_context(4, n_valid=N_VALID, seed=3)
    r = jax.jit(RandomPrune(16, seed=0))
    out = r(ctx)
    idx, ok, valid = np.asarray(out.index), np.asarray(out.valid), np.asarray(ctx.valid)
    for i in range(4):
        ri, rok = ref_random(valid[i], 16, 0, i)
        np.testing.assert_array_equal(idx[i], ri)
        np.testing.assert_array_equal(ok[i], rok)
        assert valid[i][idx[i][ok[i]]].all() and ok[i].sum() == min(16, valid[i].sum())
        assert len(set(idx[i].tolist())) == 16
    other = random_projector_context(4, n_valid=N_VALID, seed=99)
    np.testing.assert_array_equal(np.asarray(r(other).index), idx)  # content does not matter
    full = np.ones(P, bool)
    assert not np.array_equal(ref_random(full, 16, 0, 0)[0], ref_random(full, 16, 0, 1)[0])  # rows differ
    b = np.asarray(jax.jit(RandomPrune(16, seed=1))(ctx).index)
    assert not np.array_equal(idx[0], b[0])  # seeds differ


# ----------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("rule", ["floor", "center", "step"])
def test_uniform_matches_reference(rule):
    for k in (1, 48, 143):
        r = jax.jit(Uniform(k, rule))
        for seed in range(50 if k == 48 else 3):
            nv = [144, int(np.random.default_rng(seed).integers(1, 145))]
            ctx = random_projector_context(2, seed=seed, n_valid=nv)
            out = r(ctx)
            for row in range(2):
                idx, ok = ref_uniform(np.asarray(ctx.valid[row]), k, rule)
                np.testing.assert_array_equal(np.asarray(out.index[row]), idx)
                np.testing.assert_array_equal(np.asarray(out.valid[row]), ok)
                np.testing.assert_allclose(np.asarray(out.tokens[row]), np.asarray(ctx.features[row])[idx],
                                           atol=1e-6)


def test_uniform_scattered_mask():
    rng = np.random.default_rng(0)
    ctx = random_projector_context(1, seed=1)
    valid = rng.random(P) > 0.5
    ctx = dataclasses.replace(ctx, valid=jax.numpy.asarray(valid[None]))
    out = jax.jit(Uniform(20))(ctx)
    idx, ok = ref_uniform(valid, 20, "floor")
    np.testing.assert_array_equal(np.asarray(out.index[0]), idx)
    np.testing.assert_array_equal(np.asarray(out.valid[0]), ok)


# ----------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("win", [1, 2, 3, 12])
def test_pool_matches_reference(win):
    r = jax.jit(Pool(win))
    for seed in range(50 if win == 2 else 5):
        nv = [144, int(np.random.default_rng(seed).integers(1, 145))]
        ctx = random_projector_context(2, seed=seed, n_valid=nv)
        out = r(ctx)
        assert out.tokens.shape == (2, (12 // win) ** 2, 24)
        for row in range(2):
            idx, toks, ok = ref_pool(np.asarray(ctx.features[row], np.float64), np.asarray(ctx.valid[row]), 12, win)
            np.testing.assert_array_equal(np.asarray(out.index[row]), idx)
            np.testing.assert_array_equal(np.asarray(out.valid[row]), ok)
            np.testing.assert_allclose(np.asarray(out.tokens[row]), toks, atol=1e-5)
    # all valid: exactly the unmasked 2-D average pool
    ctx = random_projector_context(2, seed=5)
    x = np.asarray(ctx.features).reshape(2, 12 // win, win, 12 // win, win, 24).mean((2, 4)).reshape(2, -1, 24)
    np.testing.assert_allclose(np.asarray(r(ctx).tokens), x, atol=1e-6)


def test_pool_output_tokens_and_budget_mismatch():
    assert pool2x2().output_tokens(576) == 144
    assert pool2x2(144).output_tokens(576) == 144
    assert pool(3).output_tokens(576) == 64
    assert pool(2).output_tokens(144) == 36
    with pytest.raises(BudgetError, match="Pool.budget=128"):
        pool2x2(128).output_tokens(576)
    with pytest.raises(BudgetError, match="Pool.window=5"):
        pool(5).output_tokens(576)
    with pytest.raises(BudgetError, match="square"):
        pool(2).output_tokens(577)
    with pytest.raises(BudgetError, match="Pool.window=0"):
        pool(0)
    with pytest.raises(BudgetError, match="Pool.budget=0"):
        pool2x2(0)


# ----------------------------------------------------------------------------- shared checks
@pytest.mark.parametrize("make", [lambda: Uniform(16), lambda: Pool(2), lambda: Pool(3, 16)])
def test_batched_equals_rows(make):
    assert_batched_equals_rows(make(), random_projector_context(4, n_valid=N_VALID, seed=3))


@pytest.mark.parametrize("r", [RandomPrune(32), Uniform(32), Pool(2)])
def test_one_trace_and_no_callbacks(r):
    assert_one_trace(r, lambda s: random_projector_context(2, seed=s))
    assert_no_callbacks(r, random_projector_context(2))


def test_specs_hashable_and_factories():
    assert random_prune(8, seed=3) == RandomPrune(8, 3) and hash(random_prune(8)) == hash(RandomPrune(8))
    assert uniform(8) == Uniform(8, "floor") and pool2x2() == Pool(2) and pool(3) == Pool(3, None)
    assert {RandomPrune(8), Uniform(8), Pool(2)}


# E2E: each budget of E2E_BUDGETS once across the three controls (each e2e compiles a model; 3x3 pooling
# of the 12x12 test grid gives 16 tokens; 2x2 pooling runs the same code with another window).
@pytest.mark.parametrize("reducer,budget", [(RandomPrune(E2E_BUDGETS[0], seed=1), E2E_BUDGETS[0]),
                                            (Uniform(E2E_BUDGETS[1]), E2E_BUDGETS[1]),
                                            (Pool(3, E2E_BUDGETS[2]), E2E_BUDGETS[2])])
def test_end_to_end(reducer, budget):
    check_end_to_end(reducer, budget)


def test_budget_errors():
    for bad in (0, -1):
        with pytest.raises(BudgetError, match=f"RandomPrune.budget={bad}"):
            RandomPrune(bad)
        with pytest.raises(BudgetError, match=f"Uniform.budget={bad}"):
            Uniform(bad)
    with pytest.raises(BudgetError, match="must be a Python int"):
        Uniform(16.0)
    with pytest.raises(ValueError, match="rule"):
        Uniform(16, "nearest")
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        Uniform(145).output_tokens(144)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        RandomPrune(145).output_tokens(144)
    from tests.reducer_testlib import e2e_model, make_batch

    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="Pool.budget=32"):
        m(ids, px, attention_mask=mask, reducer=Pool(2, 32))
