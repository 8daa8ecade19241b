"""PruMerge+ == NumPy transcription of the official selection and merge; static budgets; batching, traces,
end to end on LLaVA-1.5 and LLaVA-NeXT tiny models."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.reducers import BudgetError, registry
from jaxprune.reducers.prumerge import PruMergePlus, iqr_outliers, prumerge_plus
from tests.reducer_testlib import (E2E_BUDGETS, E2E_CFG, assert_batched_equals_rows, assert_no_callbacks,
                                   assert_one_trace, check_end_to_end, e2e_model, forward_cache_size, make_batch,
                                   random_projector_context)


# ---------------------------------------------------------------------------------------------------
# The official code, transcribed: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
# llava/model/multimodal_encoder/clip_encoder.py, `token_prune_merge_advanced_plus(if_adaptive=True)` from
# `cls_attn = attn[:, 0, 1:]` on, batch size 1. torch -> NumPy: topk (sorted, descending) = stable argsort of
# the negated values (ties to the lower position); F.normalize = x / max(||x||, 1e-12); 575 = N - 1.
def complement_idx(idx, dim):
    a = np.arange(dim)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for i in range(1, ndim):
        a = a[None]
    a = np.broadcast_to(a, idx.shape[:-1] + (dim,)).copy()
    np.put_along_axis(a, idx, 0, axis=-1)  # torch.scatter(a, -1, idx, 0)
    compl = np.sort(a, axis=-1)
    compl = np.transpose(compl, (ndim - 1, *range(ndim - 1)))
    compl = np.transpose(compl[n_idx:], (*range(1, ndim), 0))
    return compl


def outlier_dectection(attn):
    attn_np = attn.astype(np.float32).flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]
    ratio = len(outlier_indices) / len(attn_np)
    return ratio


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _topk_desc(x, k, axis):
    return np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)


def official_select(cls_attn, N):
    """``cls_attn [1, N]`` -> ``idx [1, left_tokens]`` (outliers by descending attention, then the grid)."""
    reduction_ratio = outlier_dectection(cls_attn)
    idx = _topk_desc(cls_attn, int(N * reduction_ratio), axis=1)
    step_length = int(1 / reduction_ratio)
    arithmetic_sequence = np.arange(0, N - 1, int(step_length / 3))
    original_tensor_1d = idx.flatten()
    filtered_sequence = np.array([x for x in arithmetic_sequence if x not in original_tensor_1d], dtype=np.int64)
    concatenated_tensor = np.concatenate((idx, filtered_sequence[None]), axis=1)
    idx = concatenated_tensor
    return idx


def official_merge(idx, cls_attn, desired_layer_k_wo_cls, image_features, neighbours=32):
    """The merge of the kept tokens ``idx [1, left_tokens]`` and the extra token: ``[1, left_tokens + 1, C]``."""
    B, N, C = image_features.shape
    index = idx[..., None]
    Key_wo_cls = desired_layer_k_wo_cls
    x_others = np.take_along_axis(image_features, index, axis=1)
    x_others_attn = np.take_along_axis(cls_attn, idx, axis=1)
    Key_others = np.take_along_axis(Key_wo_cls, index, axis=1)
    compl = complement_idx(idx, N)
    non_topk = np.take_along_axis(image_features, compl[..., None], axis=1)
    non_topk_Key = np.take_along_axis(Key_wo_cls, compl[..., None], axis=1)
    non_topk_attn = np.take_along_axis(cls_attn, compl, axis=1)
    Key_others_norm = _normalize(Key_others)
    non_topk_Key_norm = _normalize(non_topk_Key)
    B, left_tokens, C = x_others.shape
    updated_x_others = np.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :][None, None]
            before_i_Key = Key_others_norm[b, :i, :][None]
            after_i_Key = Key_others_norm[b, i + 1:, :][None]
            before_i_x_others = x_others[b, :i, :][None]
            after_i_x_others = x_others[b, i + 1:, :][None]
            rest_x_others = np.concatenate([before_i_x_others, after_i_x_others, non_topk[b][None]], axis=1)
            before_i_x_others_attn = x_others_attn[b, :i][None]
            after_i_x_others_attn = x_others_attn[b, i + 1:][None]
            rest_x_others_attn = np.concatenate([before_i_x_others_attn, after_i_x_others_attn,
                                                 non_topk_attn[b][None]], axis=1)
            rest_Keys = np.concatenate([before_i_Key, after_i_Key, non_topk_Key_norm[b][None]], axis=1)
            cos_sim_matrix = key_others_norm @ rest_Keys.transpose(0, 2, 1)
            cluster_indices = _topk_desc(cos_sim_matrix, neighbours, axis=2)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()][..., None]
            weighted_avg = np.sum(cluster_tokens * weights, axis=1)
            updated_center = x_others[b, i, :] + weighted_avg
            updated_x_others[b, i, :] = updated_center
    extra_one_token = np.sum(non_topk * non_topk_attn[..., None], axis=1, keepdims=True)
    updated_x_others = np.concatenate([updated_x_others, extra_one_token], axis=1)
    return updated_x_others


# ---------------------------------------------------------------------------------------------------
def peaked_context(n, p, seed, sigma=1.5, **kw):
    """A random context whose [CLS] attention has outliers (per-head softmax of N(0, sigma^2) logits)."""
    ctx = random_projector_context(n, p=p, seed=seed, **kw)
    rng = np.random.default_rng(1000 + seed)
    logits = rng.standard_normal(ctx.cls_attn.shape) * sigma
    attn = np.exp(logits)
    attn /= attn.sum(-1, keepdims=True)
    return dataclasses.replace(ctx, cls_attn=jnp.asarray(attn, jnp.float32))


@functools.lru_cache(maxsize=None)
def jitted(spec):
    """One compiled function per spec (specs are hashable), shared by the tests below."""
    return jax.jit(spec)


def official_inputs(ctx, row=0):
    """What the transcription takes: head-mean attention, keys with heads concatenated, features (float64)."""
    a = np.asarray(ctx.cls_attn[row], np.float32).mean(0)[None]  # [1, N]
    k = np.asarray(ctx.keys[row], np.float64).reshape(1, ctx.num_tokens, -1)
    x = np.asarray(ctx.features[row], np.float64)[None]
    return a, k, x


@pytest.mark.parametrize("p,sigma", [(144, 1.5), (576, 1.5), pytest.param(576, 2.5, marks=pytest.mark.slow)])
def test_matches_the_official_code_at_its_own_count(p, sigma):
    """At ``budget = official kept + 1`` (the official output size): the same kept indices (in the official
    order with ``order="official"``, sorted with the default), the same merged vectors and extra token."""
    seeds = range(4) if p == 576 else range(8)
    counts = []
    for seed in seeds:
        ctx = peaked_context(1, p, seed, sigma)
        a, k, x = official_inputs(ctx)
        idx = official_select(a, p)
        want = official_merge(idx, a.astype(np.float64), k, x)
        budget = idx.shape[1] + 1
        counts.append(budget)
        for fill in ("uniform", "mask"):
            out = jitted(prumerge_plus(budget, fill=fill, order="official"))(ctx)
            np.testing.assert_array_equal(np.asarray(out.index[0, :-1]), idx[0])
            np.testing.assert_allclose(np.asarray(out.tokens[0]), want[0], atol=1e-5, rtol=0)
            assert np.asarray(out.valid).all()
        out = jitted(prumerge_plus(budget))(ctx)  # raster order: the same tokens, sorted by index
        perm = np.argsort(idx[0])
        np.testing.assert_array_equal(np.asarray(out.index[0, :-1]), idx[0][perm])
        np.testing.assert_allclose(np.asarray(out.tokens[0, :-1]), want[0, :-1][perm], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(out.tokens[0, -1]), want[0, -1], atol=1e-5, rtol=0)
    assert len(set(counts)) > 1, counts  # the official count is adaptive; the inputs exercise several


def test_iqr_outliers_match_numpy_percentile():
    rng = np.random.default_rng(0)
    for nv in (1, 2, 3, 4, 5, 7, 50, 143, 144):
        s = np.exp(rng.standard_normal((3, 144)) * 2).astype(np.float32)
        valid = np.zeros((3, 144), bool)
        valid[:, :nv] = True
        got = np.asarray(iqr_outliers(jnp.asarray(s), jnp.asarray(valid)))
        for r in range(3):
            ratio = outlier_dectection(s[r, :nv])
            assert got[r].sum() == round(ratio * nv) and not got[r, nv:].any()
            assert (s[r][got[r]].min(initial=np.inf) > s[r, :nv][~got[r, :nv]].max())


@pytest.mark.parametrize("fill", ["uniform", "mask"])
def test_static_budget_caps_or_fills_the_official_selection(fill):
    """Below the official count: the top outliers, then evenly spaced grid tokens (a subset of the official
    set); above it: the official set plus evenly spaced fill (``"uniform"``) or masked slots (``"mask"``).
    The merge is the official merge of whatever is kept."""
    p = 144
    checked = 0
    for seed in range(4):
        ctx = peaked_context(1, p, seed)
        a, k, x = official_inputs(ctx)
        off = official_select(a, p)[0]
        n_out = round(outlier_dectection(a) * p)
        outliers = set(off[:n_out].tolist())
        for budget in sorted({2, n_out, n_out + 3, len(off) - 2, len(off) + 1, len(off) + 9, p}):
            if budget < 2:
                continue
            K = budget - 1
            out = jitted(prumerge_plus(budget, fill=fill))(ctx)
            idx, ok = np.asarray(out.index[0]), np.asarray(out.valid[0])
            kept = idx[:K][ok[:K]]
            assert (np.diff(kept) > 0).all()  # raster order, distinct
            assert set(off[:min(n_out, K)].tolist()) <= set(kept.tolist())  # the top outliers first
            if K <= len(off):
                assert len(kept) == K and set(kept.tolist()) <= set(off.tolist())
                if K > n_out:  # the grid part: evenly spaced over the official grid's ranks
                    grid = np.sort(off[n_out:])
                    m = K - n_out
                    want = grid[(np.arange(m) * len(grid)) // m]
                    np.testing.assert_array_equal(np.sort(list(set(kept.tolist()) - outliers)), want)
            elif fill == "uniform":
                assert len(kept) == K and set(off.tolist()) <= set(kept.tolist())
            else:
                assert sorted(kept.tolist()) == sorted(off.tolist()) and (~ok[:K]).sum() == K - len(off)
            assert ok[K] == (len(kept) < p)  # the extra token, unless every token is kept
            want = official_merge(kept[None].astype(np.int64), a.astype(np.float64), k, x)[0]
            np.testing.assert_allclose(np.asarray(out.tokens[0, :K])[ok[:K]], want[:-1], atol=1e-5, rtol=0)
            if ok[K]:
                np.testing.assert_allclose(np.asarray(out.tokens[0, K]), want[-1], atol=1e-5, rtol=0)
            checked += 1
    assert checked > 20


def test_masks_batching_and_determinism():
    ctx = peaked_context(4, 144, 3, n_valid=[144, 60, 20, 1])
    for spec in (prumerge_plus(32), prumerge_plus(32, fill="mask", order="official"), prumerge_plus(8)):
        assert_batched_equals_rows(spec, ctx)
        out = jax.jit(spec)(ctx)
        idx, ok = np.asarray(out.index), np.asarray(out.valid)
        valid = np.asarray(ctx.valid)
        for r in range(4):
            assert valid[r][idx[r][ok[r]]].all()  # invalid tokens are never kept (nor the extra's source)
            kept = idx[r, :-1][ok[r, :-1]]
            assert len(set(kept.tolist())) == len(kept)
            if spec.fill == "uniform":
                assert len(kept) == min(spec.budget - 1, valid[r].sum())
        assert ok[3, :-1].sum() == 1 and not ok[3, -1]  # one valid token: kept, nothing left for the extra
        assert np.isfinite(np.asarray(out.tokens)).all()
        out2 = jax.jit(spec)(ctx)
        np.testing.assert_array_equal(np.asarray(out2.index), idx)
    # invalid tokens contribute nothing: garbage (even NaN) in their features does not leak
    feats = np.asarray(ctx.features).copy()
    feats[~np.asarray(ctx.valid)] = np.nan
    out = jax.jit(prumerge_plus(32))(dataclasses.replace(ctx, features=jnp.asarray(feats)))
    assert np.isfinite(np.asarray(out.tokens)[np.asarray(out.valid)]).all()


def test_one_trace_and_no_callbacks():
    assert_one_trace(prumerge_plus(32), lambda s: peaked_context(2, 144, s))
    assert_no_callbacks(prumerge_plus(32, order="official"), peaked_context(2, 144, 0))


def test_spec_registry_and_budget_errors():
    assert "prumerge_plus" in registry.names()
    assert registry.make("prumerge_plus", 64, E2E_CFG) == PruMergePlus(64)
    assert jp.reducers.prumerge_plus is prumerge_plus and jp.reducers.PruMergePlus is PruMergePlus
    assert prumerge_plus(640).per_segment(5) == prumerge_plus(128)  # the default rule: budget // n
    with pytest.raises(BudgetError, match="must be >= 2"):
        prumerge_plus(1)
    with pytest.raises(BudgetError, match="must be >= 2"):
        prumerge_plus(9).per_segment(5)
    with pytest.raises(BudgetError, match="budget=0"):
        prumerge_plus(0)
    with pytest.raises(ValueError, match="fill='all'"):
        prumerge_plus(8, fill="all")
    with pytest.raises(ValueError, match="order='sorted'"):
        prumerge_plus(8, order="sorted")
    hash(prumerge_plus(8))
    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        m(ids, px, attention_mask=mask, reducer=prumerge_plus(145))


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(budget):
    check_end_to_end(prumerge_plus(budget), budget)


def test_end_to_end_one_compile_per_budget():
    m = e2e_model()
    n_text = [4, 9, 6]
    for budget in (16, 32):
        r = prumerge_plus(budget)
        before = None
        for seed in (3, 4, 5):
            ids, mask, px = make_batch(n_text, 144, 100, 128, 24, padding="left", seed=seed)
            out = m(ids, px, attention_mask=mask, reducer=r)
            valid = np.asarray(out.attention_mask)
            assert out.logits.shape == (3, ids.shape[1] - 144 + budget, 128)
            assert np.isfinite(np.asarray(out.logits)[valid]).all()
            assert (valid.sum(1) == 2 + budget + np.asarray(n_text)).all()  # exactly the budget, every image
            if before is None:
                before = forward_cache_size(m)
        assert forward_cache_size(m) == before
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=prumerge_plus(16), max_new_tokens=4))
    assert toks.shape == (3, 4) and ((toks >= 0) & (toks < 128)).all()


# ---------------------------------------------------------------------------------------------------
# LLaVA-NeXT (anyres): one selection over the packed tokens, and per crop (budget // crops each).
NEXT_PINS = ((32, 64), (64, 32), (64, 64))
NEXT_IMG, NEXT_VOCAB = 60, 64
NEXT_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=4),
    text=TextConfig(vocab_size=NEXT_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    model_type="llava_next", image_token_index=NEXT_IMG, image_grid_pinpoints=NEXT_PINS)
NEXT_SIZES = [[(70, 20), (20, 75)], [(60, 58), (61, 44)], [(20, 75), (60, 58)]]  # tall, wide, square, cut


@functools.lru_cache(maxsize=1)
def next_model() -> jp.Llava:
    return jp.Llava.random(NEXT_CFG, seed=0)


def next_batch(sizes, seed=0):
    """Two rows of one image each, left-padded: (ids, mask, pixel_values, image_sizes, text tokens per row)."""
    from jaxprune.processing_anyres import AnyresProcessorConfig, preprocess_anyres_images

    proc = AnyresProcessorConfig(pinpoints=NEXT_PINS, crop_size=32, patch_size=4)
    rng = np.random.default_rng(seed)
    b = preprocess_anyres_images([rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in sizes], proc)
    rows, n_text = [], []
    for i in range(2):
        k = int(rng.integers(2, 6))
        rows.append(list(rng.integers(3, NEXT_IMG - 1, 3)) + [NEXT_IMG] * int(b.num_image_tokens[i])
                    + list(rng.integers(3, NEXT_IMG - 1, k)))
        n_text.append(3 + k)
    T = max(map(len, rows)) + 2
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for r, s in enumerate(rows):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    return ids, mask, b.pixel_values, b.image_sizes, np.array(n_text)


@pytest.mark.parametrize("per_crop", [False, True], ids=["global", "per_crop"])
def test_llava_next(per_crop):
    m = next_model()
    budget = 36  # of 320 = 5 crops x 64 patches
    spec = prumerge_plus(budget)
    if per_crop:
        spec = jp.reducers.next_options(spec, per_crop=True, crop_split="fixed", newlines="drop")
    before = None
    for seed, sizes in enumerate(NEXT_SIZES):
        ids, mask, px, image_sizes, n_text = next_batch(sizes, seed)
        out = m(ids, px, attention_mask=mask, image_sizes=image_sizes, reducer=spec)
        valid = np.asarray(out.attention_mask)
        assert np.isfinite(np.asarray(out.logits)[valid]).all()
        visual = valid.sum(1) - n_text
        if per_crop:  # budget // 5 = 7 per real crop (6 kept + 1 extra), crops of an image 3 or 5
            assert set(visual.tolist()) <= {3 * 7, 5 * 7}, visual
        else:
            assert (visual == budget).all(), visual
        if before is None:
            before = forward_cache_size(m)
    assert forward_cache_size(m) == before  # mixed aspect ratios: one compile
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, image_sizes=image_sizes, reducer=spec,
                                 max_new_tokens=3, eos_token_id=(), pad_token_id=0))
    assert toks.shape == (2, 3) and ((toks >= 0) & (toks < NEXT_VOCAB)).all()
