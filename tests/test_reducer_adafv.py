"""AdaFV/AdaV == NumPy transcription of the official ``adav`` branch; dedupe, masks, batching, traces, e2e."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers.adafv import AdaFV, adafv, text_after_image
from tests.reducer_testlib import (E2E_BUDGETS, assert_batched_equals_rows, assert_no_callbacks, assert_one_trace,
                                   check_end_to_end, random_projector_context)

T_TEXT = 16
N_VALID = [144, 10, 50, 3]


def layout_ctx(n: int, seed: int, n_valid: list[int] | None = None):
    """A random context whose text mask has the LLaVA layout ``[pad] prefix <image> text [pad]``.

    Returns the context and, per row, the slice of text tokens after the image (the official text)."""
    ctx = random_projector_context(n, seed=seed, n_valid=n_valid, t=T_TEXT)
    rng = np.random.default_rng(1000 + seed)
    tv = np.zeros((n, T_TEXT), bool)
    spans = []
    for i in range(n):
        pad, pre, img, txt = rng.integers(0, 4), rng.integers(1, 4), rng.integers(2, 5), rng.integers(2, 6)
        start = pad if rng.random() < 0.5 else 0  # left or right padding
        tv[i, start:start + pre] = True
        a = start + pre + img
        tv[i, a:a + txt] = True
        spans.append((a, a + txt))
    return dataclasses.replace(ctx, text_valid=jnp.asarray(tv)), spans


# ----------------------------------------------------------------------------- official, in NumPy
def max_sqrt_sum_with_indices(l1: np.ndarray, l2: np.ndarray, K: int):
    """As the official helper: sort both lists descending, prefix sums, argmax of the product."""
    l1, l2 = l1.astype(np.float32), l2.astype(np.float32)
    o1, o2 = np.argsort(-l1, kind="stable"), np.argsort(-l2, kind="stable")
    p1 = np.concatenate([[np.float32(0)], np.cumsum(l1[o1], dtype=np.float32)])
    p2 = np.concatenate([[np.float32(0)], np.cumsum(l2[o2], dtype=np.float32)])
    k1 = np.arange(min(K, len(l1)) + 1)
    k2 = K - k1
    m = (k2 >= 0) & (k2 <= len(l2))
    pot = p1[k1[m]] * p2[k2[m]]
    best = int(np.argmax(pot))
    return o1[: k1[m][best]].tolist(), o2[: k2[m][best]].tolist()


def t2i(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    simi = (norm(text) @ norm(image).T).astype(np.float32) * 100  # [T, P]
    simi = np.exp(simi - simi.max(-1, keepdims=True))
    return (simi / simi.sum(-1, keepdims=True)).max(0)  # softmax over image tokens, max over text


def official_picks(text: np.ndarray, image: np.ndarray, cls_attn: np.ndarray, overall_tokens: int):
    """``method == "adav"`` of JiayiV/AdaV llava_llama.py for one LLaVA-1.5 image (N_img = 1).

    Returns the two candidate lists (token ids by rank) and the chosen rank positions in each."""
    n_img = 1
    k = int(int(overall_tokens / 2) / n_img)
    v_token_num = k * 2 * n_img
    simi = t2i(text, image)
    indices = np.argsort(-simi, kind="stable")[: k * n_img * 2]  # topk, sorted
    value = simi[indices]
    cls = cls_attn.mean(0)  # heads mean
    indices_cls = np.argsort(-cls, kind="stable")[: k * 2]
    value_cls = cls[indices_cls]
    b = int(2 * (k * n_img) * 0.25)
    si, ci = max_sqrt_sum_with_indices(value[b:], value_cls[b:], v_token_num - 2 * b)
    si = list(range(b)) + [s + b for s in si]
    ci = list(range(b)) + [s + b for s in ci]
    return indices, indices_cls, si, ci


def reference(text, image, cls_attn, overall_tokens):
    indices, indices_cls, si, ci = official_picks(text, image, cls_attn, overall_tokens)
    return np.sort(np.concatenate([indices[si], indices_cls[ci]]))  # duplicates kept


def reference_dedupe(text, image, cls_attn, overall_tokens):
    """Our documented dedupe rule, written sequentially: union of the two picks, then walk the two
    full rankings alternately (T2I first) from where each pick stopped, adding unseen tokens."""
    _, _, si, ci = official_picks(text, image, cls_attn, overall_tokens)
    L = 2 * (overall_tokens // 2)
    r1 = np.argsort(-t2i(text, image), kind="stable")
    r2 = np.argsort(-cls_attn.mean(0), kind="stable")
    n1, n2 = len(si), len(ci)
    assert si == list(range(n1)) and ci == list(range(n2)) and n1 + n2 == L
    chosen = list(dict.fromkeys(np.concatenate([r1[:n1], r2[:n2]]).tolist()))
    q = 0
    while len(chosen) < L:
        for lst, start in ((r1, n1), (r2, n2)):
            t = int(lst[start + q])
            if t not in chosen and len(chosen) < L:
                chosen.append(t)
        q += 1
    return np.sort(np.array(chosen))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("budget", [2, 16, 48, 95, 144])
def test_matches_official_numpy(budget):
    r = jax.jit(AdaFV(budget))
    dup_total = 0
    n_inputs = 50 if budget in (16, 48) else 5
    for seed in range(n_inputs):
        ctx, spans = layout_ctx(1, seed)
        out = r(ctx)
        a, e = spans[0]
        feats = np.asarray(ctx.features[0])
        want = reference(np.asarray(ctx.text_embeds[0])[a:e], feats, np.asarray(ctx.cls_attn[0]), budget)
        got = np.asarray(out.index[0])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(np.asarray(out.tokens[0]), feats[want], atol=1e-5)
        assert np.asarray(out.valid).all()  # duplicates are fed twice, both valid
        dup_total += len(got) - len(set(got.tolist()))
    assert out.tokens.shape[1] == 2 * (budget // 2) == AdaFV(budget).output_tokens(144)
    if budget in (16, 48):
        assert dup_total > 0  # the faithful mode really does keep duplicates


@pytest.mark.parametrize("budget", [16, 48])
def test_dedupe_matches_sequential_rule(budget):
    r = jax.jit(AdaFV(budget, dedupe=True))
    for seed in range(50):
        ctx, spans = layout_ctx(1, seed)
        a, e = spans[0]
        want = reference_dedupe(np.asarray(ctx.text_embeds[0])[a:e], np.asarray(ctx.features[0]),
                                np.asarray(ctx.cls_attn[0]), budget)
        out = r(ctx)
        np.testing.assert_array_equal(np.asarray(out.index[0]), want)
        assert np.asarray(out.valid).all() and len(set(want.tolist())) == budget


def test_text_after_image_and_all():
    tv = np.array([[0, 0, 1, 1, 0, 0, 0, 1, 1, 1],  # left pad, prefix, image, text
                   [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],  # prefix, image, text, right pad
                   [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # no image span: all
                   [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    got = np.asarray(text_after_image(jnp.asarray(tv)))
    want = tv.copy()
    want[0, :4] = False
    want[1, :5] = False
    np.testing.assert_array_equal(got, want)
    # "all": every valid text token, the prefix included
    ctx, _ = layout_ctx(1, 0)
    out = jax.jit(AdaFV(32, text_tokens="all"))(ctx)
    tvr = np.asarray(ctx.text_valid[0])
    want = reference(np.asarray(ctx.text_embeds[0])[tvr], np.asarray(ctx.features[0]), np.asarray(ctx.cls_attn[0]),
                     32)
    np.testing.assert_array_equal(np.asarray(out.index[0]), want)


@pytest.mark.parametrize("dedupe", [False, True])
def test_masks(dedupe):
    ctx, spans = layout_ctx(4, 3, n_valid=N_VALID)
    assert_batched_equals_rows(AdaFV(16, dedupe=dedupe), ctx)
    out = jax.jit(AdaFV(16, dedupe=dedupe))(ctx)
    idx, ok, valid = np.asarray(out.index), np.asarray(out.valid), np.asarray(ctx.valid)
    for i, nv in enumerate(N_VALID):
        assert valid[i][idx[i][ok[i]]].all() and not valid[i][idx[i][~ok[i]]].any()
        assert ok[i][: ok[i].sum()].all()  # valid slots first
        if nv >= 16:  # the official code on the valid tokens alone
            a, e = spans[i]
            want = reference(np.asarray(ctx.text_embeds[i])[a:e], np.asarray(ctx.features[i])[:nv],
                             np.asarray(ctx.cls_attn[i])[:, :nv], 16)
            if dedupe:
                assert set(want.tolist()) <= set(idx[i].tolist()) and len(set(idx[i].tolist())) == 16
            else:
                np.testing.assert_array_equal(idx[i], want)
        else:  # too few valid tokens: every valid token is used
            assert set(idx[i][ok[i]].tolist()) == set(range(nv))
            if dedupe:
                assert ok[i].sum() == nv and len(set(idx[i].tolist())) == 16


def test_no_text_tokens():
    ctx, _ = layout_ctx(1, 0)
    ctx = dataclasses.replace(ctx, text_valid=jnp.zeros_like(ctx.text_valid))
    out = jax.jit(AdaFV(16))(ctx)
    assert np.asarray(out.valid).all() and np.isfinite(np.asarray(out.tokens)).all()


def test_one_trace_and_no_callbacks():
    for r in (AdaFV(32), AdaFV(32, dedupe=True)):
        assert_one_trace(r, lambda s: layout_ctx(2, s)[0])
        assert_no_callbacks(r, layout_ctx(2, 0)[0])


@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(budget):
    check_end_to_end(AdaFV(budget), budget)


def test_budget_errors_and_factory():
    assert adafv(16) == AdaFV(16) and adafv(16, dedupe=True) == AdaFV(16, True)
    assert hash(adafv(16)) == hash(AdaFV(16))
    assert AdaFV(17).output_tokens(144) == 16 and AdaFV(145).output_tokens(144) == 144
    for bad in (0, 1):
        with pytest.raises(BudgetError, match=f"AdaFV.budget={bad}"):
            AdaFV(bad)
    with pytest.raises(BudgetError, match="AdaFV.budget must be a Python int"):
        AdaFV(16.0)
    with pytest.raises(BudgetError, match="AdaFV.budget=146 keeps 146 tokens, larger than the 144 tokens"):
        AdaFV(146).output_tokens(144)
    with pytest.raises(ValueError, match="quota"):
        AdaFV(16, quota=0.6)
    with pytest.raises(ValueError, match="text_tokens"):
        AdaFV(16, text_tokens="prefix")
    from tests.reducer_testlib import e2e_model, make_batch

    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        m(ids, px, attention_mask=mask, reducer=AdaFV(146))
