"""VisionZip == NumPy transcription of the official ``CLIPVisionTower_VisionZip.forward``; masks, batching,
traces, end to end (the LLM receives CLS + dominant + contextual, as the official tower hands over)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.reducers import BudgetError
from jaxprune.reducers.visionzip import VisionZip, visionzip
from tests.reducer_testlib import (E2E_BUDGETS, E2E_CFG, assert_batched_equals_rows, assert_no_callbacks,
                                   assert_one_trace, check_end_to_end, e2e_model, make_batch, random_vision_context)

P = 144


def reference(attn: np.ndarray, hidden: np.ndarray, keys: np.ndarray, dominant: int, contextual: int):
    """Official VisionZip on one image (dvlab-research/VisionZip @ 3151f6d, visionzip/clip_encoder.py).

    ``attn [heads, S]`` CLS-row attention, ``hidden [S, D]``, ``keys [S, heads, hd]``; ``dominant`` counts CLS
    (main.py passes ``dominant - 1``). Returns (source index of each output token, output tokens)."""
    S = hidden.shape[0]
    metric = keys.astype(np.float64).mean(axis=1)  # raw_key_states.mean(1): head mean
    cls_attention_sum = attn[:, 1:].astype(np.float64).sum(axis=0)
    topk = np.argsort(-cls_attention_sum, kind="stable")[: dominant - 1] + 1
    all_indices = np.concatenate([[0], topk])
    mask = np.ones(S, bool)
    mask[all_indices] = False
    dominant_tokens = hidden[~mask]  # masked_select keeps index order
    metric_filtered, hidden_filtered = metric[mask], hidden[mask].astype(np.float64)
    metric_normalized = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
    n_rem = metric_normalized.shape[0]
    step = max(1, n_rem // contextual)
    target_indices = np.arange(0, n_rem, step)[:contextual]
    others = ~np.isin(np.arange(n_rem), target_indices)
    similarity = metric_normalized[others] @ metric_normalized[target_indices].T
    assign_one_hot = np.zeros((others.sum(), contextual))
    assign_one_hot[np.arange(others.sum()), similarity.argmax(axis=1)] = 1
    counts = np.maximum(assign_one_hot.sum(axis=0), 1)[:, None]
    aggregated = assign_one_hot.T @ hidden_filtered[others] / counts
    contextual_tokens = hidden_filtered[target_indices] + aggregated
    index = np.concatenate([np.flatnonzero(~mask), np.flatnonzero(mask)[target_indices]])
    return index, np.concatenate([dominant_tokens, contextual_tokens])


def check_row(out, ctx, i: int, spec: VisionZip, subset: np.ndarray | None = None):
    """Row ``i`` of ``out`` == the official algorithm run on the valid tokens ``subset`` of row ``i``."""
    sub = np.arange(ctx.valid.shape[1]) if subset is None else subset
    idx, toks = reference(np.asarray(ctx.cls_attn[i])[:, sub], np.asarray(ctx.hidden[i])[sub],
                          np.asarray(ctx.keys[i])[sub], spec.dominant, spec.contextual)
    np.testing.assert_array_equal(np.asarray(out.index[i]), np.concatenate([[0], sub[idx]]))
    assert np.asarray(out.valid[i]).all()
    got = np.asarray(out.tokens[i])
    np.testing.assert_array_equal(got[0], np.asarray(ctx.hidden[i, 0]))  # the CLS slot the model drops
    np.testing.assert_allclose(got[1:], toks, atol=1e-5, rtol=1e-5)


SPECS = [VisionZip.for_budget(48), VisionZip.for_budget(32), VisionZip.for_budget(16), VisionZip(1, 10),
         VisionZip(2, 1), VisionZip(100, 44), VisionZip(135, 10)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dominant}+{s.contextual}")
def test_matches_numpy_reference(spec):
    ctx = random_vision_context(50, seed=spec.dominant)  # 50 independent random rows
    out = jax.jit(spec)(ctx)
    assert out.tokens.shape == (50, 1 + spec.dominant + spec.contextual, 16)
    for i in range(50):
        check_row(out, ctx, i, spec)


def test_masked_rows_equal_official_on_valid_tokens():
    """Arbitrary masks: identical to the official algorithm run on the valid tokens alone."""
    spec = VisionZip(20, 6)
    ctx = random_vision_context(20, seed=7)
    rng = np.random.default_rng(7)
    valid = rng.random((20, 1 + P)) < rng.uniform(0.3, 0.95, (20, 1))
    valid[:, 0] = True
    ctx = dataclasses.replace(ctx, valid=jnp.asarray(valid))
    out = jax.jit(spec)(ctx)
    for i in range(20):
        check_row(out, ctx, i, spec, np.flatnonzero(valid[i]))


def test_batched_rows_and_unfillable_slots():
    spec = VisionZip(20, 6)
    ctx = random_vision_context(4, n_valid=[144, 10, 50, 22], seed=3)
    assert_batched_equals_rows(spec, ctx)
    out = jax.jit(spec)(ctx)
    idx, ok, valid = np.asarray(out.index), np.asarray(out.valid), np.asarray(ctx.valid)
    for i, nv in enumerate([144, 10, 50, 22]):
        assert valid[i][idx[i][ok[i]]].all()  # invalid tokens never selected
        assert idx[i, 0] == idx[i, 1] == 0 and ok[i, :2].all()  # CLS slot + CLS as first dominant token
        assert ok[i, 2:21].sum() == min(19, nv)  # dominant patches
        assert ok[i, 21:].sum() == min(6, max(0, nv - 19))  # contextual targets
        assert (np.diff(idx[i, 1:21][ok[i, 1:21]]) > 0).all()
    check_row(out, ctx, 2, spec, np.arange(51))  # a valid prefix: official on the first 1 + 50 tokens
    assert np.isfinite(np.asarray(out.tokens)).all()


def test_one_trace_and_no_callbacks():
    spec = VisionZip.for_budget(32)
    assert_one_trace(spec, lambda s: random_vision_context(2, seed=s))
    assert_no_callbacks(spec, random_vision_context(2))


def test_for_budget_official_split():
    assert [(v.dominant, v.contextual) for v in map(visionzip.for_budget, (64, 128, 192))] == [
        (54, 10), (108, 20), (162, 30)]
    assert visionzip(54, 10) == VisionZip(54, 10) and hash(visionzip(54, 10)) == hash(VisionZip(54, 10))
    assert visionzip(54, 10).budget == 64 and visionzip(54, 10).output_tokens(576) == 64


@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(budget):
    check_end_to_end(VisionZip.for_budget(budget), budget)


def test_llm_receives_official_tokens():
    """In the model, the LLM's visual tokens come from [CLS, dominant patches, targets] of the official run
    on the model's own CLIP feature layer (``kept`` = source patch index, -1 for CLS)."""
    spec = VisionZip.for_budget(48)
    m = e2e_model()
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=48)
    L = E2E_CFG.feature_layer_index
    tap = jax.jit(lambda p, x: nnx.merge(m.graphdef, p).vision(x, L, taps=(L,))[1][L])(m.params, jnp.asarray(px))
    out = m(ids, px, attention_mask=mask, reducer=spec)
    kept = np.asarray(out.kept)
    assert np.asarray(out.kept_valid).all()
    for i in range(3):
        idx, _ = reference(np.asarray(tap.cls_attn[i]), np.asarray(tap.hidden[i]), np.asarray(tap.keys[i]),
                           spec.dominant, spec.contextual)
        np.testing.assert_array_equal(kept[i], idx - 1)


def test_budget_errors():
    with pytest.raises(BudgetError, match="dominant=0"):
        VisionZip(0, 10)
    with pytest.raises(BudgetError, match="contextual=0"):
        visionzip(10, 0)
    with pytest.raises(BudgetError, match="must be a Python int"):
        VisionZip(10.0, 2)
    with pytest.raises(BudgetError, match="budget=1"):
        VisionZip.for_budget(1)
    with pytest.raises(BudgetError, match="dominant=146 is larger than the 145"):
        VisionZip(146, 1).output_tokens(144)
    with pytest.raises(BudgetError, match="contextual=10 is larger than the 5"):
        VisionZip(140, 10)(random_vision_context(1))
    m = e2e_model()
    ids, mask, px = make_batch([3], P, 100, 128, 24)
    with pytest.raises(BudgetError, match="contextual=6 is larger than the 5"):
        m(ids, px, attention_mask=mask, reducer=VisionZip(140, 6))
