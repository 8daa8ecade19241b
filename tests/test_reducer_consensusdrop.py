"""ConsensusDrop == an independent NumPy transcription of the specified algorithm; batching, traces, end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers.consensusdrop import ConsensusDrop, consensusdrop
from tests.reducer_testlib import (
    E2E_BUDGETS,
    assert_batched_equals_rows,
    assert_no_callbacks,
    assert_one_trace,
    check_end_to_end,
    random_projector_context,
)

FUSIONS = ("rrf", "borda", "minmax")
SOURCES = ("shallow", "proxy")


# --------------------------------------------------------------------------------------------- reference
def ref_ranks(s: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """1 = best among the valid tokens, ties to the lower index (invalid tokens: 0, never used)."""
    order = sorted(np.flatnonzero(valid), key=lambda j: (-s[j], j))
    r = np.zeros(len(s), np.int64)
    r[order] = np.arange(1, len(order) + 1)
    return r


def ref_proxy(te, tv, feats, valid, query_rows: int) -> np.ndarray:
    """mean over the query rows of softmax_j(cos(e_t, f_j) / 0.01) over valid image tokens."""
    te, feats = te.astype(np.float64), feats.astype(np.float64)
    last = np.flatnonzero(tv).max()
    rows = [t for t in range(len(tv)) if tv[t] and t > last - query_rows]
    e = te / np.maximum(np.linalg.norm(te, axis=-1, keepdims=True), 1e-6)
    f = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-6)
    out = np.zeros(len(feats))
    for t in rows:
        z = np.where(valid, (f @ e[t]) / 0.01, -np.inf)
        a = np.exp(z - z[valid].max())
        out += a / a.sum()
    return out / len(rows)


def ref_fuse(v, x, valid, fusion: str) -> np.ndarray:
    if fusion == "minmax":
        def nm(s):
            lo, hi = s[valid].min(), s[valid].max()
            return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        return nm(v.astype(np.float64)) + nm(x.astype(np.float64))
    rv, rx = ref_ranks(v, valid), ref_ranks(x, valid)
    if fusion == "rrf":  # float32 as specified, so exact RRF ties (ranks (a, b) vs (b, a)) match bit for bit
        one, k = np.float32(1), np.float32(60)
        return one / (k + rv.astype(np.float32)) + one / (k + rx.astype(np.float32))
    n = valid.sum()
    return ((n - rv) + (n - rx)).astype(np.float64)  # Borda points


def reference(row: dict, budget: int, source: str, fusion: str, merge: bool = True, query_rows: int = 32):
    """One image: (kept indices ascending, kept tokens, {dropped index: kept index it merged into})."""
    valid = row["valid"]
    v = row["cls_attn"].astype(np.float64).mean(0)
    x = row["t2i"] if source == "shallow" else ref_proxy(row["te"], row["tv"], row["feats"], valid, query_rows)
    s = ref_fuse(v, x, valid, fusion)
    keep = sorted(sorted(np.flatnonzero(valid), key=lambda j: (-s[j], j))[:budget])
    feats = row["feats"].astype(np.float64)
    tokens = feats[keep].copy()
    assign = {}
    if merge:
        m = row["keys"].astype(np.float64).mean(1)  # [P, hd] head-mean keys
        m = m / np.linalg.norm(m, axis=-1, keepdims=True)
        groups = {i: [] for i in keep}
        for j in np.flatnonzero(valid):
            if j in groups:
                continue
            sim = m[keep] @ m[j]
            assign[j] = keep[int(np.argmax(sim))]
            groups[assign[j]].append(j)
        tokens = np.stack([(feats[i] + feats[groups[i]].sum(0)) / (1 + len(groups[i])) for i in keep])
    return np.asarray(keep), tokens, assign


def rows_of(ctx) -> list[dict]:
    a = {k: np.asarray(getattr(ctx, f)) for k, f in [("valid", "valid"), ("cls_attn", "cls_attn"),
                                                       ("feats", "features"), ("keys", "keys"),
                                                       ("te", "text_embeds"), ("tv", "text_valid"),
                                                       ("t2i", "text_to_image")]}
    return [{k: val[i] for k, val in a.items()} for i in range(a["valid"].shape[0])]


def check_against_reference(r: ConsensusDrop, ctx) -> None:
    out = jax.jit(r)(ctx)
    idx, ok, tok = np.asarray(out.index), np.asarray(out.valid), np.asarray(out.tokens)
    into = None if out.merged_into is None else np.asarray(out.merged_into)
    P = ctx.num_tokens
    for i, row in enumerate(rows_of(ctx)):
        keep, tokens, assign = reference(row, r.budget, r.source, r.fusion, r.merge, r.query_rows)
        n = len(keep)
        assert ok[i].sum() == n and ok[i, :n].all(), (i, ok[i])
        np.testing.assert_array_equal(idx[i, :n], keep, err_msg=f"row {i}")
        np.testing.assert_allclose(tok[i, :n], tokens, atol=1e-5, rtol=0, err_msg=f"row {i}")
        if r.merge:
            dropped = np.setdiff1d(np.arange(P), idx[i])  # complement of index, ascending
            want = np.array([-1 if j not in assign else int(np.flatnonzero(keep == assign[j])[0]) for j in dropped])
            np.testing.assert_array_equal(into[i], want, err_msg=f"row {i}")
        else:
            assert into is None


N_VALID = [144 if i % 4 else 30 + 2 * i for i in range(50)]  # 50 tie-free images, 13 with a padded tail
# H = 256: text/visual cosines ~ N(0, 1/16), so the proxy's softmax(cos / 0.01) is not saturated; with very
# peaky rows (H = 24) several tokens share ~1/|Q| up to float32 rounding, i.e. the proxy signal has ties.
H = 256


# --------------------------------------------------------------------------------------------- vs NumPy
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("budget", [1, 16, 48, 143])
def test_matches_numpy_reference(source, fusion, budget):
    seed = 100 * FUSIONS.index(fusion) + 10 * SOURCES.index(source) + budget
    ctx = random_projector_context(50, seed=seed, n_valid=N_VALID, with_t2i=True, h=H)
    check_against_reference(consensusdrop(budget, source=source, fusion=fusion), ctx)


@pytest.mark.parametrize("source", SOURCES)
def test_reference_without_merge_and_short_query_window(source):
    ctx = random_projector_context(50, seed=7, n_valid=N_VALID, with_t2i=True, t=16, h=H)
    check_against_reference(consensusdrop(32, source=source, merge=False, query_rows=5), ctx)
    check_against_reference(consensusdrop(32, source=source, fusion="borda", query_rows=3), ctx)


def test_merge_false_is_plain_gather_of_the_same_selection():
    ctx = random_projector_context(3, seed=4, with_t2i=True)
    a, b = jax.jit(consensusdrop(20))(ctx), jax.jit(consensusdrop(20, merge=False))(ctx)
    np.testing.assert_array_equal(np.asarray(a.index), np.asarray(b.index))
    f = np.asarray(ctx.features)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.take_along_axis(f, np.asarray(b.index)[..., None], 1))
    assert not np.allclose(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_agreeing_signals_give_that_ranking(fusion):
    """When the cross-attention equals the CLS saliency, every fusion keeps the top-k of that signal."""
    ctx = random_projector_context(4, seed=9, with_t2i=True)
    v = ctx.cls_attn.mean(axis=1)
    ctx = dataclasses.replace(ctx, text_to_image=v)
    out = jax.jit(consensusdrop(24, fusion=fusion, merge=False))(ctx)
    want = np.sort(np.argsort(-np.asarray(v), axis=1, kind="stable")[:, :24], axis=1)
    np.testing.assert_array_equal(np.asarray(out.index), want)


def test_fusions_differ_on_disagreeing_signals():
    ctx = random_projector_context(4, seed=11, with_t2i=True)
    kept = {f: np.asarray(jax.jit(consensusdrop(16, fusion=f, merge=False))(ctx).index) for f in FUSIONS}
    assert not np.array_equal(kept["rrf"], kept["minmax"]) or not np.array_equal(kept["borda"], kept["minmax"])


def test_invalid_tokens_never_kept_or_merged_and_full_budget():
    ctx = random_projector_context(4, n_valid=[144, 10, 50, 3], seed=3, with_t2i=True)
    for source in SOURCES:
        out = jax.jit(consensusdrop(16, source=source))(ctx)
        idx, ok, into = np.asarray(out.index), np.asarray(out.valid), np.asarray(out.merged_into)
        valid = np.asarray(ctx.valid)
        for i in range(4):
            assert valid[i][idx[i][ok[i]]].all()
            assert ok[i].sum() == min(16, valid[i].sum())
            dropped = np.setdiff1d(np.arange(144), idx[i])
            assert ((into[i] >= 0) == valid[i][dropped]).all()  # exactly the valid dropped tokens merge
            assert ok[i][into[i][into[i] >= 0]].all()  # ... into valid kept slots
        assert np.isfinite(np.asarray(out.tokens)).all()
    full = jax.jit(consensusdrop(144))(ctx)  # nothing dropped: tokens are the valid features, untouched
    assert full.merged_into.shape == (4, 0)
    np.testing.assert_array_equal(np.asarray(full.index[0]), np.arange(144))
    np.testing.assert_allclose(np.asarray(full.tokens[0]), np.asarray(ctx.features[0]), atol=0)


def test_rows_without_query_text_are_finite():
    ctx = random_projector_context(2, seed=5)
    ctx = dataclasses.replace(ctx, text_valid=jnp.zeros_like(ctx.text_valid))
    out = jax.jit(consensusdrop(16, source="proxy"))(ctx)
    assert np.isfinite(np.asarray(out.tokens)).all() and np.asarray(out.valid).all()


@pytest.mark.parametrize("source", SOURCES)
def test_batched_equals_rows(source):
    ctx = random_projector_context(4, n_valid=[144, 10, 50, 3], seed=3, with_t2i=True)
    assert_batched_equals_rows(consensusdrop(16, source=source), ctx)


@pytest.mark.parametrize("source", SOURCES)
def test_one_trace_and_no_callbacks(source):
    r = consensusdrop(32, source=source, fusion="borda")
    assert_one_trace(r, lambda s: random_projector_context(2, seed=s, with_t2i=True, n_valid=[144, 40 + s]))
    assert_no_callbacks(r, random_projector_context(2, with_t2i=True))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("budget", E2E_BUDGETS)
def test_end_to_end(source, budget):
    check_end_to_end(consensusdrop(budget, source=source, shallow_layers=2 if source == "shallow" else None), budget)


# --------------------------------------------------------------------------------------------- options
def test_spec_is_static_and_resolves_shallow_layers():
    r = consensusdrop(16)
    assert (r.shallow_layers, r.query_rows, r.stage) == (2, 32, "projector")
    assert consensusdrop(16, source="proxy").shallow_layers == 0
    assert consensusdrop(16, shallow_layers=3).shallow_layers == 3
    assert hash(r) == hash(consensusdrop(16, shallow_layers=2)) and r == ConsensusDrop(16)
    assert r.output_tokens(144) == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.budget = 3  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="deep"), "source='deep' unknown"),
    (dict(fusion="mean"), "fusion='mean' unknown"),
    (dict(merge=1), "merge must be a bool"),
    (dict(query_rows=0), "query_rows must be"),
    (dict(query_rows=2.0), "query_rows must be"),
    (dict(shallow_layers=0), "needs shallow_layers >= 1"),
    (dict(shallow_layers=1.5), "shallow_layers must be a Python int"),
    (dict(source="proxy", shallow_layers=2), "shallow_layers must be 0"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        consensusdrop(16, **kwargs)


def test_budget_errors():
    with pytest.raises(BudgetError, match="budget=0"):
        consensusdrop(0)
    with pytest.raises(BudgetError, match="Python int"):
        consensusdrop(16.0)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        jax.jit(consensusdrop(145))(random_projector_context(1, with_t2i=True))
    with pytest.raises(ValueError, match="needs ctx.text_to_image"):
        jax.jit(consensusdrop(16))(random_projector_context(1))
    from tests.reducer_testlib import e2e_model, make_batch

    m = e2e_model()
    ids, mask, px = make_batch([3], 144, 100, 128, 24)
    with pytest.raises(BudgetError, match="larger than the 144 tokens"):
        m(ids, px, attention_mask=mask, reducer=consensusdrop(145, source="proxy"))
