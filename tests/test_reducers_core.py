"""Tests for jaxprune.reducers._core against plain NumPy transcriptions written here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.reducers import _core as C

TRIALS = 50


# ----------------------------------------------------------------------------- NumPy references
def ref_select_topk(scores, k, valid):
    idx, ok = [], []
    for s, v in zip(scores, valid):
        s = np.where(np.isnan(s), -np.inf, s)
        order = np.lexsort((np.arange(len(s)), -s, ~v))  # valid first, high score, low index
        pick = order[:k]
        pv = np.sort(pick[v[pick]])
        pi = np.flatnonzero(~v)[: k - len(pv)]  # fillers: lowest-index invalid tokens
        idx.append(np.concatenate([pv, pi]))
        ok.append(np.arange(k) < len(pv))
    return np.array(idx, np.int32), np.array(ok)


def ref_complement(idx, n, valid):
    rest = np.array([np.setdiff1d(np.arange(n), r) for r in idx], np.int32).reshape(len(idx), -1)
    return rest, np.take_along_axis(valid, rest, 1)


def ref_cosine(a, b, eps=1e-6):
    na = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
    nb = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), eps)
    return np.einsum("bmd,bkd->bmk", na, nb)


def ref_assign(sim, tv):
    out = np.zeros(sim.shape[:2], np.int32)
    for b in range(sim.shape[0]):
        for m in range(sim.shape[1]):
            cand = [j for j in range(sim.shape[2]) if tv[b, j]]
            out[b, m] = max(cand, key=lambda j: (sim[b, m, j], -j)) if cand else 0
    return out


def ref_merge(kept, dropped, assign, w, dv, c, mode):
    kept = kept.astype(np.float64)
    out, sizes = kept.copy(), np.zeros(kept.shape[:2])
    for b in range(kept.shape[0]):
        for j in range(kept.shape[1]):
            mem = [i for i in range(dropped.shape[1]) if dv[b, i] and assign[b, i] == j]
            ws = np.array([w[b, i] for i in mem])
            xs = np.array([dropped[b, i] for i in mem]).reshape(len(mem), dropped.shape[2])
            if mode == "mean":
                out[b, j] = (kept[b, j] + xs.sum(0)) / (1 + len(mem))
            elif mode in ("weighted", "size"):
                tot = c[b, j] + ws.sum()
                out[b, j] = (c[b, j] * kept[b, j] + (ws[:, None] * xs).sum(0)) / tot
                sizes[b, j] = tot
            else:  # VisionZip: target + one_hot^T @ x / counts.clamp(min=1) (w = 1)
                out[b, j] = kept[b, j] + (ws[:, None] * xs).sum(0) / max(ws.sum(), 1e-30)
    return out, sizes


def ref_pool(x, h, w, win):
    b, _, d = x.shape
    g = x.reshape(b, h, w, d)
    out = np.zeros((b, h // win, w // win, d))
    for r in range(h // win):
        for c in range(w // win):
            out[:, r, c] = g[:, r * win:(r + 1) * win, c * win:(c + 1) * win].mean(axis=(1, 2))
    return out.reshape(b, -1, d)


def ref_masked_softmax(x, m):
    out = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape[:-1]):
        if m[i].any():
            e = np.exp(x[i][m[i]] - x[i][m[i]].max())
            out[i][m[i]] = e / e.sum()
    return out


# ----------------------------------------------------------------------------- helpers
def tie_free(rng, shape):
    """Distinct floats per row (a random permutation, scaled and shifted)."""
    n = shape[-1]
    p = np.argsort(rng.random(shape), axis=-1).astype(np.float32)
    return (p / n * 4.0 - 2.0 + rng.normal(size=shape[:-1] + (1,))).astype(np.float32)


def rand_valid(rng, b, n, min_valid=0):
    counts = rng.integers(min_valid, n + 1, size=b)
    v = np.zeros((b, n), bool)
    for i, c in enumerate(counts):
        v[i, rng.choice(n, c, replace=False)] = True
    return v


B, N, D = 3, 17, 8
_select = jax.jit(C.select_topk, static_argnums=1)
_compl = jax.jit(C.complement_indices, static_argnums=1)
_cos = jax.jit(C.cosine_similarity)
_assign = jax.jit(C.assign_argmax)
_merge = jax.jit(C.merge_into, static_argnames="mode")
_pool = jax.jit(C.pool_2d, static_argnums=(1, 2))
_softmax = jax.jit(C.masked_softmax)


# ----------------------------------------------------------------------------- parity
def test_select_topk_matches_reference():
    rng = np.random.default_rng(0)
    for t in range(TRIALS):
        k = (1, 5, N)[t % 3]
        s = tie_free(rng, (B, N))
        v = rand_valid(rng, B, N) if t % 2 else np.ones((B, N), bool)
        idx, ok = _select(s, k, v)
        ridx, rok = ref_select_topk(s, k, v)
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(ok, rok)
        assert idx.dtype == jnp.int32 and idx.shape == (B, k)


def test_gather_and_complement_match_reference():
    rng = np.random.default_rng(1)
    for t in range(TRIALS):
        k = (1, 6, N)[t % 3]
        x = rng.normal(size=(B, N, 2, 3)).astype(np.float32)
        v = rand_valid(rng, B, N)
        idx, ok = _select(tie_free(rng, (B, N)), k, v)
        np.testing.assert_array_equal(C.gather(x, idx), np.stack([x[b, idx[b]] for b in range(B)]))
        np.testing.assert_array_equal(C.gather_mask(v, idx, ok),
                                      np.take_along_axis(v, np.asarray(idx), 1) & np.asarray(ok))
        rest, rest_ok = _compl(idx, N, v)
        r, rok = ref_complement(np.asarray(idx), N, v)
        np.testing.assert_array_equal(rest, r)
        np.testing.assert_array_equal(rest_ok, rok)
        assert rest.shape == (B, N - k)


def test_cosine_and_assign_match_reference():
    rng = np.random.default_rng(2)
    for t in range(TRIALS):
        a = rng.normal(size=(B, 9, D)).astype(np.float32)
        b = rng.normal(size=(B, 5, D)).astype(np.float32)
        if t % 5 == 0:
            a[0, 0] = 0.0  # zero vector: eps-safe, similarity 0
        tv = rand_valid(rng, B, 5, min_valid=1)
        sim = _cos(a, b)
        np.testing.assert_allclose(sim, ref_cosine(a, b), atol=1e-5)
        np.testing.assert_array_equal(_assign(sim, tv), ref_assign(np.asarray(sim), tv))


@pytest.mark.parametrize("mode", ["mean", "weighted", "size", "target_plus_mean"])
def test_merge_into_matches_reference(mode):
    rng = np.random.default_rng(3)
    K, M = 4, 11
    for t in range(TRIALS):
        kept = rng.normal(size=(B, K, D)).astype(np.float32)
        dropped = rng.normal(size=(B, M, D)).astype(np.float32)
        dv = rand_valid(rng, B, M)
        dropped[~dv] = np.nan  # invalid tokens must contribute nothing, even NaN
        assign = rng.integers(0, K, size=(B, M)).astype(np.int32)
        w = rng.uniform(0.5, 2.0, size=(B, M)).astype(np.float32)
        c = rng.uniform(0.5, 3.0, size=(B, K)).astype(np.float32)
        kw = {} if mode == "mean" else {"weights": w}
        if mode in ("weighted", "size"):
            kw["kept_weight"] = c
        out = _merge(kept, dropped, assign, dropped_valid=dv, mode=mode, **kw)
        wr = w if "weights" in kw else np.ones_like(w)
        if mode == "target_plus_mean" and t % 2:  # VisionZip proper: unweighted
            out = _merge(kept, dropped, assign, dropped_valid=dv, mode=mode)
            wr = np.ones_like(w)
        ref, sizes = ref_merge(kept, dropped, assign, wr, dv, c, mode)
        if mode == "size":
            out, new_sizes = out
            np.testing.assert_allclose(new_sizes, sizes, rtol=1e-5, atol=1e-5)
        assert out.shape == (B, K, D) and out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_pool_and_static_patterns_match_reference():
    rng = np.random.default_rng(4)
    for t in range(TRIALS):
        win = (1, 2, 3)[t % 3]
        x = rng.normal(size=(2, 6 * 12, 5)).astype(np.float32)
        np.testing.assert_allclose(_pool(x, (6, 12), win), ref_pool(x, 6, 12, win), atol=1e-5)
        n = int(rng.integers(1, 700))
        k = int(rng.integers(1, n + 1))
        for rule, f in [("floor", lambda i: i * n // k), ("center", lambda i: (2 * i + 1) * n // (2 * k)),
                        ("step", lambda i: i * max(1, n // k))]:
            u = C.uniform_indices(n, k, rule)
            assert u.dtype == np.int32 and list(u) == [f(i) for i in range(k)]
            assert (np.diff(u) > 0).all() and u[0] >= 0 and u[-1] < n
        h, w, sh, sw = (int(v) for v in rng.integers(1, 9, size=4))
        g = C.strided_grid_indices(h, w, sh, sw)
        assert list(g) == [r * w + c for r in range(0, h, sh) for c in range(0, w, sw)]


def test_masked_softmax_matches_reference():
    rng = np.random.default_rng(5)
    for t in range(TRIALS):
        x = rng.normal(size=(B, 4, N)).astype(np.float32) * 5
        m = rng.random((B, 4, N)) < 0.5
        m[0, 0] = False  # fully masked row
        out = np.asarray(_softmax(x, m))
        assert not np.isnan(out).any()
        np.testing.assert_allclose(out, ref_masked_softmax(x, m), atol=1e-6)
        np.testing.assert_array_equal(out[0, 0], 0.0)
    assert not np.isnan(C.masked_softmax(jnp.full((2, 3), -jnp.inf), None)).any()


# ----------------------------------------------------------------------------- ties
def test_select_topk_ties_prefer_lower_index():
    s = jnp.array([[5.0, 1.0, 5.0, 5.0, 0.0], [2.0] * 5, [0.0, -0.0, 0.0, 1.0, -0.0]])
    idx, ok = _select(s, 2)
    np.testing.assert_array_equal(idx, [[0, 2], [0, 1], [0, 3]])
    assert ok.all()
    idx, _ = _select(jnp.zeros((1, 9)), 4)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3]])
    # reversed importance but equal values at the boundary
    idx, _ = _select(jnp.array([[1.0, 3.0, 3.0, 3.0, 9.0]]), 3)
    np.testing.assert_array_equal(idx, [[1, 2, 4]])


def test_assign_argmax_ties_and_invalid_targets():
    sim = jnp.array([[[0.5, 0.9, 0.9], [0.7, 0.7, 0.1], [jnp.nan, 0.2, 0.3]]])
    np.testing.assert_array_equal(_assign(sim), [[1, 0, 2]])
    tv = jnp.array([[False, True, True]])
    np.testing.assert_array_equal(_assign(sim, tv), [[1, 1, 2]])
    sim = jnp.full((1, 2, 3), -jnp.inf)  # valid beats invalid even at -inf
    np.testing.assert_array_equal(_assign(sim, jnp.array([[False, False, True]])), [[2, 2]])


# ----------------------------------------------------------------------------- masks
def test_select_topk_masked_rows():
    s = jnp.array([[9.0, 8.0, 7.0, 6.0, 5.0], [9.0, jnp.nan, -jnp.inf, 6.0, 5.0]])
    v = jnp.array([[False, True, False, True, False], [False, True, True, False, False]])
    idx, ok = _select(s, 3, v)
    np.testing.assert_array_equal(idx, [[1, 3, 0], [1, 2, 0]])  # NaN/-inf valid beat invalid 9.0
    np.testing.assert_array_equal(ok, [[True, True, False], [True, True, False]])
    idx, ok = _select(s, 2, jnp.zeros((2, 5), bool))
    np.testing.assert_array_equal(idx, [[0, 1], [0, 1]])
    assert not ok.any()
    rng = np.random.default_rng(6)
    for t in range(TRIALS):
        v = rand_valid(rng, B, N)
        k = (1, 5, 12, N)[t % 4]
        idx, ok = map(np.asarray, _select(rng.normal(size=(B, N)).astype(np.float32), k, v))
        for b in range(B):
            assert len(set(idx[b])) == k and (0 <= idx[b]).all() and (idx[b] < N).all()
            nv = v[b].sum()
            assert ok[b].sum() == min(k, nv) and ok[b][: min(k, nv)].all()
            assert v[b, idx[b][ok[b]]].all() and not v[b, idx[b][~ok[b]]].any()


def _pipeline(s, x, v, k):
    idx, ok = C.select_topk(s, k, v)
    rest, rest_ok = C.complement_indices(idx, s.shape[1], v)
    kept, dropped = C.gather(x, idx), C.gather(x, rest)
    sim = C.cosine_similarity(dropped, kept)
    asg = _assign(sim, ok)
    merged = C.merge_into(kept, dropped, asg, dropped_valid=rest_ok, mode="target_plus_mean")
    merged2, sizes = C.merge_into(kept, dropped, asg, dropped_valid=rest_ok, mode="size")
    attn = C.masked_softmax(jnp.einsum("bkd,bnd->bkn", kept, x), v[:, None, :])
    return idx, ok, rest, rest_ok, asg, merged, merged2, sizes, attn


def test_batch_equals_rows():
    rng = np.random.default_rng(7)
    k = 6
    s = rng.normal(size=(4, N)).astype(np.float32)
    x = rng.normal(size=(4, N, D)).astype(np.float32)
    v = np.zeros((4, N), bool)
    for b, c in enumerate([0, 3, 10, N]):
        v[b, rng.choice(N, c, replace=False)] = True
    fn = jax.jit(_pipeline, static_argnums=3)
    full = fn(s, x, v, k)
    for b in range(4):
        row = fn(s[b:b + 1], x[b:b + 1], v[b:b + 1], k)
        for a, r in zip(full, row):
            np.testing.assert_allclose(np.asarray(a)[b:b + 1], r, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- compile hygiene
def test_one_trace_for_many_inputs():
    rng = np.random.default_rng(8)

    def fn(s, x, v):
        return _pipeline(s, x, v, 5)

    jitted = jax.jit(chex.assert_max_traces(fn, n=1))
    for _ in range(20):
        out = jitted(rng.normal(size=(B, N)).astype(np.float32),
                     rng.normal(size=(B, N, D)).astype(np.float32), rand_valid(rng, B, N))
    jax.block_until_ready(out)


def _prim_names(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _prim_names(inner)


def test_no_callbacks_in_jaxpr():
    s, x, v = jnp.zeros((B, N)), jnp.ones((B, N, D)), jnp.ones((B, N), bool)
    jaxprs = [
        jax.make_jaxpr(lambda s, x, v: _pipeline(s, x, v, 5))(s, x, v),
        jax.make_jaxpr(lambda x: C.pool_2d(x, (1, N), 1))(x),
        jax.make_jaxpr(lambda x: C.merge_into(x, x, jnp.zeros((B, N), jnp.int32),
                                              weights=s, mode="weighted"))(x),
        jax.make_jaxpr(lambda x: C.merge_into(x, x, jnp.zeros((B, N), jnp.int32)))(x),
    ]
    names = [n for j in jaxprs for n in _prim_names(j.jaxpr)]
    assert "top_k" in names or any("top_k" in n for n in names)
    assert not [n for n in names if "callback" in n]


def test_dtypes_and_jit_bf16():
    x = jnp.ones((1, 4, 3), jnp.bfloat16)
    out = jax.jit(C.merge_into)(x[:, :2], x[:, 2:], jnp.array([[0, 0]], jnp.int32))
    assert out.dtype == jnp.bfloat16
    idx, _ = _select(jnp.array([[1, 3, 2]], jnp.int32), 1)
    np.testing.assert_array_equal(idx, [[1]])
    assert C.masked_softmax(jnp.ones((2, 3), jnp.bfloat16), None).dtype == jnp.bfloat16


def test_merge_weighted_zero_weight_keeps_token():
    kept, dropped = jnp.ones((1, 2, 3)), jnp.full((1, 1, 3), 5.0)
    out = C.merge_into(kept, dropped, jnp.array([[0]]), weights=jnp.zeros((1, 1)),
                       kept_weight=jnp.zeros((1, 2)), mode="weighted")
    np.testing.assert_array_equal(out, np.ones((1, 2, 3)))
    out = C.merge_into(kept, dropped, jnp.array([[1]]), mode="target_plus_mean")
    np.testing.assert_array_equal(out, [[[1, 1, 1], [6, 6, 6]]])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("k", [0, N + 1, -1, 2.0, True, None])
def test_select_topk_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        C.select_topk(jnp.zeros((2, N)), k)


def test_select_topk_k_message_names_n():
    with pytest.raises(ValueError, match=f"k=18.*N={N}"):
        C.select_topk(jnp.zeros((2, N)), N + 1)
    jax.eval_shape(lambda x: C.select_topk(x, np.int64(3)), jnp.zeros((2, N)))  # numpy int ok


def test_static_argument_errors():
    x = jnp.zeros((1, 36, 2))
    for bad in (0, 4, 5, 1.5):
        with pytest.raises(ValueError, match="window"):
            C.pool_2d(x, (6, 6), bad)
    with pytest.raises(ValueError, match="grid"):
        C.pool_2d(x, (5, 6), 1)
    with pytest.raises(ValueError, match="k"):
        C.uniform_indices(4, 5)
    with pytest.raises(ValueError, match="rule"):
        C.uniform_indices(4, 2, "odd")
    with pytest.raises(ValueError, match="stride_w"):
        C.strided_grid_indices(4, 4, 1, 0)
    with pytest.raises(ValueError, match="n"):
        C.complement_indices(jnp.zeros((1, 3), jnp.int32), 2)
    k3 = jnp.zeros((1, 3, 2))
    with pytest.raises(ValueError, match="mode"):
        C.merge_into(k3, k3, jnp.zeros((1, 3), jnp.int32), mode="max")
    with pytest.raises(ValueError, match="weights"):
        C.merge_into(k3, k3, jnp.zeros((1, 3), jnp.int32), weights=jnp.ones((1, 3)))
