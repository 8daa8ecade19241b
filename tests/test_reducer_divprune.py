"""DivPrune == NumPy transcription of the official greedy max-min selection; batching, traces, end to end."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers.divprune import DivPrune, divprune
from tests.reducer_testlib import (E2E_BUDGETS, assert_batched_equals_rows, assert_no_callbacks, assert_one_trace,
                                   check_end_to_end, random_projector_context)


def reference(feats: np.ndarray, k: int) -> np.ndarray:
    """vbdi/divprune llava_arch.py DivPrune (one image): D = 1 - cos; first pick = argmax of the
    second-smallest entry per column; then argmax of the column-wise min over the selected rows;
    the kept indices are sorted."""
    x = feats.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - x @ x.T
    s: list[int] = []
    for i in range(k):
        scores = np.sort(d, axis=0)[1, :] if i == 0 else d[s, :].min(axis=0)
        s.append(int(np.argmax(scores)))  # first maximum
    assert len(set(s)) == k  # tie-free random inputs never re-pick a token
    return np.sort(np.array(s))


@pytest.mark.parametrize("k", [1, 2, 16, 48, 143, 144])
def test_matches_numpy_reference(k):
    r = jax.jit(DivPrune(k))
    n_inputs = 50 if k in (16, 48) else 5
    for seed in range(n_inputs):
        ctx = random_projector_context(1, seed=seed)
        out = r(ctx)
        feats = np.asarray(ctx.features[0])
        idx = reference(feats, k)
        np.testing.assert_array_equal(np.asarray(out.index[0]), idx)
        np.testing.assert_allclose(np.asarray(out.tokens[0]), feats[idx], atol=1e-6)
        assert np.asarray(out.valid).all()


def test_masked_rows_equal_reference_on_valid_tokens():
    """A row with n valid tokens selects exactly what the official code selects on those n tokens."""
    n_valid = [144, 10, 50, 3]
    ctx = random_projector_context(4, n_valid=n_valid, seed=3)
    out = jax.jit(DivPrune(16))(ctx)
    idx, ok = np.asarray(out.index), np.asarray(out.valid)
    for i, nv in enumerate(n_valid):
        want = reference(np.asarray(ctx.features[i])[:nv], min(16, nv))
        np.testing.assert_array_equal(idx[i][ok[i]], want)
        assert ok[i].sum() == min(16, nv) and ok[i][: ok[i].sum()].all()  # valid picks first
        np.testing.assert_array_equal(idx[i][~ok[i]], np.arange(nv, nv + 16 - ok[i].sum()))  # fillers
        assert len(set(idx[i].tolist())) == 16


def test_batched_equals_rows():
    assert_batched_equals_rows(DivPrune(16), random_projector_context(4, n_valid=[144, 10, 50, 3], seed=3))


def test_exact_duplicates_never_repicked():
    ctx = random_projector_context(1, seed=0)
    f = np.asarray(ctx.features).copy()
    f[0, 4:] = f[0, :4][np.arange(140) % 4]  # only 4 distinct vectors
    ctx = dataclasses.replace(ctx, features=jax.numpy.asarray(f))
    idx = np.asarray(jax.jit(DivPrune(8))(ctx).index[0])
    assert len(set(idx.tolist())) == 8 and set((idx % 4).tolist()) == {0, 1, 2, 3}  # every distinct vector kept


def test_one_trace_and_no_callbacks():
    assert_one_trace(DivPrune(32), lambda s: random_projector_context(2, seed=s))
    assert_no_callbacks(DivPrune(32), random_projector_context(2))


@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(budget):
    check_end_to_end(DivPrune(budget), budget)


def test_budget_errors_and_factory():
    assert divprune(16) == DivPrune(16) and hash(divprune(16)) == hash(DivPrune(16))
    with pytest.raises(BudgetError, match="DivPrune.budget=0"):
        DivPrune(0)
    with pytest.raises(BudgetError, match="DivPrune.budget must be a Python int"):
        DivPrune(1.5)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        DivPrune(145).output_tokens(144)
    from tests.reducer_testlib import e2e_model, make_batch

    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        m(ids, px, attention_mask=mask, reducer=DivPrune(145))
