"""ADSC (training-free) == NumPy strides; grid tracking, schedules' average arithmetic, batching, traces, e2e."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.reducers import BudgetError
from jaxprune.reducers._core import uniform_indices
from jaxprune.reducers.adsc import ADSCCut, adsc, adsc_plan, adsc_schedule, default_layers, grid_step, schedule_counts
from jaxprune.reducers.llm import LLMContext
from tests.reducer_testlib import run_forward
from tests.reducer_testlib import assert_no_callbacks, e2e_model, forward_cache_size, make_batch

V, H, T = 144, 8, 170


def make_ctx(seed: int, n_valid: list[int], v: int = V) -> LLMContext:
    """Rows: left padding, 3 prefix tokens, ``v`` visual slots (the first ``n_valid[b]`` valid), text."""
    rng = np.random.default_rng(seed)
    B = len(n_valid)
    valid = np.zeros((B, T), bool)
    vis = np.zeros((B, v), np.int32)
    for b, nv in enumerate(n_valid):
        pad = int(rng.integers(0, T - v - 3 - 5))
        valid[b, pad:] = True
        valid[b, pad + 3 + nv:pad + 3 + v] = False
        vis[b] = pad + 3 + np.arange(v)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return LLMContext(hidden=f(B, T, H), valid=jnp.asarray(valid),
                      positions=jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0), jnp.int32),
                      visual_index=jnp.asarray(vis), visual_valid=jnp.asarray(np.take_along_axis(valid, vis, 1)),
                      last_index=jnp.full((B,), T - 1, jnp.int32), prev_q=f(B, T, 2, 4), prev_k=f(B, T, 2, 4),
                      next_q=None, next_k=None, normed=f(B, T, H))


def numpy_raster(vv: np.ndarray, k: int) -> list[int]:
    """Plain rule: the valid tokens of rank floor(i n / k), i < k (all of them when n < k)."""
    slots = np.flatnonzero(vv)
    n = len(slots)
    return sorted(slots[(np.arange(k) * n) // k].tolist() if n >= k else slots.tolist())


def numpy_grid(v: int, grid, stride) -> list[int]:
    gh, gw = grid
    return np.arange(v).reshape(-1, gh, gw)[:, ::stride[0], ::stride[1]].reshape(-1).tolist()


def check(out, ctx, b, expect):
    slots = np.asarray(out.slots[b])
    valid = np.asarray(out.valid[b])
    assert (np.diff(slots) > 0).all()  # ascending, distinct: every token keeps its own slot's position
    assert slots[valid].tolist() == expect
    np.testing.assert_array_equal(np.asarray(out.tokens[b]), np.asarray(ctx.visual_hidden[b])[slots])


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [48, 37])
def test_raster_matches_numpy(keep):
    """50 seeds (rows) with random valid visual counts, incl. fewer than ``keep``."""
    rng = np.random.default_rng(keep)
    n_valid = [V] * 5 + rng.integers(10, V, 45).tolist()
    ctx = make_ctx(keep, n_valid)
    out = jax.jit(ADSCCut(layer=2, keep=keep))(ctx)
    for b in range(len(n_valid)):
        check(out, ctx, b, numpy_raster(np.asarray(ctx.visual_valid[b]), keep))
    # every token valid: exactly uniform_indices, and x[::3] when keep divides the pool
    assert np.asarray(out.slots[0]).tolist() == uniform_indices(V, keep).tolist()
    assert uniform_indices(V, 48).tolist() == list(range(0, V, 3))


@pytest.mark.parametrize("grid,keep,stride", [((12, 12), 36, (2, 2)), ((12, 12), 72, (1, 2)), ((12, 12), 16, (3, 3)),
                                              ((6, 12), 36, (1, 2)), ((6, 6), 36, (1, 2))])
def test_grid_matches_numpy(grid, keep, stride):
    v = 144 if grid == (12, 12) else 72  # (6, 12): one image; (6, 6): two images in the pool
    cut = ADSCCut(layer=1, keep=keep, mode="grid", grid=None if grid == (12, 12) else grid)
    g, out_grid, _ = cut.plan_grid(v)
    assert g == grid and (g[0] // out_grid[0], g[1] // out_grid[1]) == stride
    ctx = make_ctx(0, [v, v - 30], v=v)
    out = jax.jit(cut)(ctx)
    expect = numpy_grid(v, grid, stride)
    assert len(expect) == keep
    check(out, ctx, 0, expect)
    np.testing.assert_array_equal(np.asarray(out.slots[1]), expect)
    np.testing.assert_array_equal(np.asarray(out.valid[1]), np.asarray(expect) < v - 30)


def test_grid_step_rule():
    assert grid_step((24, 24), 144) == (12, 12)
    assert grid_step((24, 24), 288) == (24, 12)  # most square; ties -> more rows
    assert grid_step((24, 12), 144) == (12, 12)
    assert grid_step((24, 24), 64) == (8, 8)
    with pytest.raises(BudgetError, match=r"50 tokens per image is not a 12x12 grid subsampled by integer strides"):
        grid_step((12, 12), 50)


def test_grid_chain_tracks_the_current_grid():
    r = adsc((1, 2, 3), (72, 36, 9), mode="grid", grid=(12, 12))
    assert [c.grid for c in r.reducers] == [(12, 12), (12, 6), (6, 6)]
    n, grids = 144, []
    for c in r.reducers:
        grids.append(c.output_grid(n))
        n = c.output_visual(n)
    assert grids == [(12, 6), (6, 6), (3, 3)] and n == 9
    # grid=None: squares only (576 -> 144 -> 36 is fine, 288 is not a square)
    assert [c.grid for c in adsc((2, 8), (144, 36), mode="grid").reducers] == [None, (12, 12)]
    with pytest.raises(BudgetError, match=r"count 288 after layer 2 is not a square grid; pass grid="):
        adsc((2, 8), (288, 144), mode="grid")


def test_batched_equals_rows():
    """B=4 rows with different valid visual counts == each row alone (raster and grid)."""
    ctx = make_ctx(9, [144, 100, 40, 20])
    for cut in (ADSCCut(layer=2, keep=32), ADSCCut(layer=2, keep=36, mode="grid")):
        f = jax.jit(cut)
        full = f(ctx)
        for b in range(4):
            one = f(jax.tree.map(lambda x, b=b: x[b:b + 1], ctx))
            for name in ("slots", "valid", "tokens"):
                np.testing.assert_array_equal(np.asarray(getattr(full, name)[b]), np.asarray(getattr(one, name)[0]))
    grid = numpy_grid(144, (12, 12), (2, 2))  # the grid pattern keeps its slots; validity is gathered
    assert np.asarray(full.valid).sum(1).tolist() == [sum(i < n for i in grid) for n in (144, 100, 40, 20)]


def test_one_trace_and_no_callbacks():
    cut = ADSCCut(layer=2, keep=37)
    rng = np.random.default_rng(0)
    chex.clear_trace_counter()
    f = jax.jit(chex.assert_max_traces(lambda c: cut(c), n=1))
    for s in range(20):
        jax.block_until_ready(f(make_ctx(s, rng.integers(20, V + 1, 2).tolist())).tokens)
    assert_no_callbacks(cut, make_ctx(0, [V, 50]))
    assert_no_callbacks(ADSCCut(layer=2, keep=36, mode="grid"), make_ctx(0, [V, 50]))


# ---------------------------------------------------------------------------------------------------
PLANS = {  # (average, mode) -> (layers, keeps) for LLaVA-1.5-7B (32 layers, 576 = 24x24 visual tokens)
    (192, "raster"): ((2, 8, 16), (322, 180, 101)),
    (128, "raster"): ((2, 8, 16), (242, 101, 43)),
    (64, "raster"): ((2, 8, 16), (110, 21, 4)),
    (192, "grid"): ((8, 16), (96, 48)),
    (128, "grid"): ((2, 8, 16), (288, 96, 32)),
    (64, "grid"): ((2, 8, 16), (96, 32, 4)),
}


@pytest.mark.parametrize("average,mode", list(PLANS))
def test_schedule_average(average, mode):
    """sum(count per layer) / num_layers == average within 0.25 token (raster) or max(1, 2%) (grid)."""
    layers, keeps = adsc_plan(average, num_layers=32, total=576, mode=mode)
    assert (layers, keeps) == PLANS[(average, mode)]
    counts = schedule_counts(layers, keeps, 32, 576)
    assert len(counts) == 32 and counts[0] == 576 and counts[-1] == keeps[-1]
    assert counts[layers[0] - 1] == 576 and counts[layers[0]] == keeps[0]  # cut after K layers: layer K on
    avg = sum(counts) / 32
    tol = 0.25 if mode == "raster" else max(1.0, 0.02 * average)
    assert abs(avg - average) <= tol, (avg, average)
    r = adsc_schedule(average, mode=mode)
    n = 576
    for cut, k in zip(r.reducers, keeps):  # every cut valid on the pool it receives (grid: divisibility)
        n = cut.output_visual(n)
        assert n == k
    assert all(c.positions == "keep" for c in r.reducers)


def test_schedule_arithmetic_by_hand():
    assert default_layers(32) == (2, 8, 16) and default_layers(4) == (1, 2)
    # raster 192: 2 layers x 576 + 6 x 322 + 8 x 180 + 16 x 101 = 6140 = 32 x 191.875
    assert 2 * 576 + 6 * 322 + 8 * 180 + 16 * 101 == 6140
    assert sum(schedule_counts((2, 8, 16), (322, 180, 101), 32, 576)) == 6140
    # grid 64: 2 x 576 + 6 x 96 (12x8) + 8 x 32 (4x8) + 16 x 4 (2x2) = 2048 = 32 x 64
    assert sum(schedule_counts((2, 8, 16), (96, 32, 4), 32, 576)) == 2048
    # the e2e model (4 layers, 144 = 12x12 tokens)
    assert adsc_plan(72, num_layers=4, total=144, mode="grid") == ((1, 2), (72, 36))


@pytest.mark.parametrize("call,match", [
    (lambda: adsc_plan(600), r"average=600 must be in \["),
    (lambda: adsc_plan(20), r"average=20 must be in \[36.938"),
    (lambda: adsc_plan(64, num_layers=8), r"average=64 must be in \[72.875, 576\).*deeper decoder is needed"),
    (lambda: adsc_plan(100, num_layers=4, total=144, mode="grid", layers=(1,)), r"no grid schedule on 12x12"),
    (lambda: adsc_plan(192, layers=(8, 2)), r"strictly increasing"),
    (lambda: adsc((1, 2), (20, 30)), r"grows the visual token count \(20 -> 30\)"),
    (lambda: adsc((2, 2), (20, 10)), r"strictly increasing"),
    (lambda: adsc((2,), (20, 10)), r"one keep per layer"),
    (lambda: ADSCCut(layer=0, keep=10), r"layer=0 is outside \[1"),
    (lambda: ADSCCut(layer=1, keep=50, mode="grid", grid=(12, 12)).output_visual(144), r"not a 12x12 grid subsamp"),
    (lambda: ADSCCut(layer=1, keep=50, mode="grid", grid=(12, 12)).output_visual(200), r"not a whole number of 12x12"),
    (lambda: ADSCCut(layer=1, keep=35, mode="grid", grid=(6, 6)).output_visual(72), r"keep=35 is not a multiple of"),
    (lambda: ADSCCut(layer=1, keep=10, mode="pool"), r"mode='pool' is not one of"),
    (lambda: ADSCCut(layer=1, keep=10, positions="shift"), r"positions='shift' is not one of"),
    (lambda: ADSCCut(layer=1, keep=10, mode="grid").output_visual(288), r"needs a square pool, got 288"),
])
def test_spec_errors(call, match):
    with pytest.raises(BudgetError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
_forward_cache_size = forward_cache_size


def test_end_to_end_one_compile_per_budget():
    m = e2e_model()
    n_text = [4, 9, 6]
    ids, mask, px = make_batch(n_text, 144, 100, 128, 24, padding="left", seed=3)
    T0 = ids.shape[1]
    specs = [adsc((1, 3), (48, 16)), adsc((1, 2, 3), (72, 36, 9), mode="grid", grid=(12, 12))]
    for r in specs:
        final = r.reducers[-1].keep
        before = _forward_cache_size(m)
        for seed in (3, 4):
            ids, mask, px = make_batch(n_text, 144, 100, 128, 24, padding="left", seed=seed)
            out = m(ids, px, attention_mask=mask, reducer=r)
            assert out.logits.shape == (3, T0 - 144 + final, 128)
            valid = np.asarray(out.attention_mask)
            assert np.isfinite(np.asarray(out.logits)[valid]).all()
            assert (valid.sum(1) == 2 + final + np.asarray(n_text)).all()
        assert _forward_cache_size(m) == before + 1
    r = adsc((1, 3), (48, 16), positions="renumber")
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=r, max_new_tokens=16))
    assert toks.shape == (3, 16) and (toks >= 0).all() and (toks < 128).all()


def test_gather_equals_mask():
    """Keep-position selection: removing the dropped tokens == masking them out of attention. One cut: the
    machinery's mask-only mode does not shrink the pool, so a later cut would see the uncut grid."""
    m = e2e_model()
    ids, mask, px = make_batch([4, 9, 6], 144, 100, 128, 24, padding="left", seed=3)
    r = adsc((2,), (36,), mode="grid")
    g = run_forward(m, ids, px, mask, None, r)
    mk = run_forward(m, ids, px, mask, None, r, mask_only=True)
    a = np.asarray(g.logits)[np.asarray(g.attention_mask)]
    b = np.asarray(mk.logits)[np.asarray(mk.attention_mask)]
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("spec,match", [
    (lambda: adsc((1, 4), (48, 16)), r"layer=4 is outside \[1, 4\)"),
    (lambda: adsc((2,), (200,)), r"keep=200 is larger than the 144 tokens"),
    (lambda: adsc((1,), (50,), mode="grid"), r"50 tokens per image is not a 12x12 grid"),
])
def test_model_errors(spec, match):
    m = e2e_model()
    ids, mask, px = make_batch([4, 9, 6], 144, 100, 128, 24, padding="left", seed=0)
    with pytest.raises(BudgetError, match=match):
        m(ids, px, attention_mask=mask, reducer=spec())
