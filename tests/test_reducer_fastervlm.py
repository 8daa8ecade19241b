"""FasterVLM == NumPy transcription of the official selection; batching, traces, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers.fastervlm import FasterVLM
from tests.reducer_testlib import (E2E_BUDGETS, assert_batched_equals_rows, assert_no_callbacks, assert_one_trace,
                                   check_end_to_end, random_projector_context)


def reference(cls_attn: np.ndarray, feats: np.ndarray, k: int):
    """Official: image_attentions.mean(heads) -> topk -> sort -> gather (one image)."""
    s = cls_attn.mean(0)
    idx = np.sort(np.argsort(-s, kind="stable")[:k])
    return idx, feats[idx]


@pytest.mark.parametrize("k", [1, 16, 48, 143])
def test_matches_numpy_reference(k):
    for seed in range(50):
        ctx = random_projector_context(1, seed=seed)
        out = FasterVLM(k)(ctx)
        idx, f = reference(np.asarray(ctx.cls_attn[0]), np.asarray(ctx.features[0]), k)
        np.testing.assert_array_equal(np.asarray(out.index[0]), idx)
        np.testing.assert_allclose(np.asarray(out.tokens[0]), f, atol=1e-6)
        assert np.asarray(out.valid).all()


def test_batched_rows_and_invalid_tokens_never_chosen():
    ctx = random_projector_context(4, n_valid=[144, 10, 50, 3], seed=3)
    assert_batched_equals_rows(FasterVLM(16), ctx)
    out = FasterVLM(16)(ctx)
    idx, ok = np.asarray(out.index), np.asarray(out.valid)
    valid = np.asarray(ctx.valid)
    for i in range(4):
        assert valid[i][idx[i][ok[i]]].all()
        assert ok[i].sum() == min(16, valid[i].sum())


def test_one_trace_and_no_callbacks():
    assert_one_trace(FasterVLM(32), lambda s: random_projector_context(2, seed=s))
    assert_no_callbacks(FasterVLM(32), random_projector_context(2))


@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(budget):
    check_end_to_end(FasterVLM(budget), budget)


def test_budget_errors():
    with pytest.raises(BudgetError, match="budget=0"):
        FasterVLM(0)
    from tests.reducer_testlib import e2e_model, make_batch

    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        m(ids, px, attention_mask=mask, reducer=FasterVLM(145))
