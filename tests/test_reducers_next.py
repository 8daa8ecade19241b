"""Reducers on LLaVA-NeXT (anyres) inputs: jaxprune.families.llava_next.

Tiny NeXT config: CLIP 32 px / patch 4 -> 8x8 = 64 patches per crop, pinpoints (h, w) 32x64 / 64x32 / 64x64, so
an image is 3 crops (1x2 or 2x1 tiles) or 5 crops (2x2), "full" = 5 x 64 = 320 (the papers' 2880 = 5 x 576) and
the budgets 640 / 320 / 160 of 2880 become 71 / 36 / 18. The batch mixes tall, wide, square and cut-square
images, two per row, left-padded; the matrix spreads the three newline policies over pre- and in-LLM reducers.
The default run covers every reducer at the 320-equivalent; the 640 / 160 equivalents of every reducer are marked
``slow`` (each budget is a compile, ~5 s each on a loaded 2-core box; ``pytest -m slow``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.models.anyres import AnyresGeometry, build_layout
from jaxprune.processing_anyres import AnyresProcessorConfig, preprocess_anyres_images
from jaxprune.families import llava_next as pn
from jaxprune.reducers.compose import as_tuple
from jaxprune.reducers.base import BudgetError
from jaxprune.reducers.pyramiddrop import pyramiddrop
from jaxprune.reducers.visiondrop_vision import VisionDropVision

R = jp.reducers
PINS = ((32, 64), (64, 32), (64, 64))
IMG, VOCAB = 60, 64
CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=4),
    text=TextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    model_type="llava_next", image_token_index=IMG, image_grid_pinpoints=PINS)
PROC = AnyresProcessorConfig(pinpoints=PINS, crop_size=32, patch_size=4)
GEOM = AnyresGeometry.from_config(CFG)
P, C, FULL = 64, 5, 320
BUDGETS = {"640": 71, "320": 36, "160": 18}  # round(320 * b / 2880)
# (h, w): tall 2x1 (columns cut), wide 1x2 (rows cut), square 2x2 (nothing cut), cut-square 2x2 (columns cut)
SIZES = {"tall": (70, 20), "wide": (20, 75), "square": (60, 58), "cutsq": (61, 44)}
MIXES = [["tall", "wide", "square", "cutsq"], ["square", "cutsq", "wide", "tall"], ["wide", "wide", "tall", "square"]]
V16_PINS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@functools.lru_cache(maxsize=1)
def model() -> jp.Llava:
    return jp.Llava.random(CFG, seed=0)


def batch(names, seed=0):
    """Two rows of two images, left-padded; returns (ids, mask, pixel_values, image_sizes, text tokens per row);
    ``batch.trailing`` = text tokens after each row's last image (DART's text pivots come from there)."""
    rng = np.random.default_rng(seed)
    b = preprocess_anyres_images([rng.integers(0, 256, SIZES[n] + (3,), dtype=np.uint8) for n in names], PROC)
    rows, n_text, trailing = [], [], []
    for r in range(2):
        seq, nt = list(rng.integers(3, IMG - 1, 3)), 3
        for i in (2 * r, 2 * r + 1):
            k = int(rng.integers(2, 6))
            seq += [IMG] * int(b.num_image_tokens[i]) + list(rng.integers(3, IMG - 1, k))
            nt += k
        rows.append(seq)
        n_text.append(nt)
        trailing.append(k)
    T = max(map(len, rows)) + 3
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for r, s in enumerate(rows):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    batch.trailing = np.array(trailing)
    return ids, mask, b.pixel_values, b.image_sizes, np.array(n_text)


def run(reducer, names=MIXES[0], seed=0):
    ids, mask, px, sizes, n_text = batch(names, seed)
    out = model()(ids, px, attention_mask=mask, image_sizes=sizes, reducer=reducer)
    return out, build_layout(GEOM, sizes), n_text


# ---------------------------------------------------------------------------------------------------
# The reducer matrix: (name, builder(budget) -> spec, kind). In-LLM "budgets" are the visual tokens kept per
# image after the cut (FastV / DART convention; x2 images per row); options vary so every newline policy,
# both crop splits and per-crop mode are exercised.
def _pdrop(b):
    return pyramiddrop(layers=(1, 2), ratios=(1.5 * b / FULL, b / FULL), total=2 * FULL)


MATRIX = {
    "fastervlm": (lambda b: R.fastervlm(b), "pre"),
    "fastervlm_per_crop": (lambda b: pn.next_options(R.fastervlm(b), per_crop=True, crop_split="fixed",
                                                     newlines="keep"), "pre"),
    "visionzip": (lambda b: pn.next_options(R.visionzip.for_budget(b), newlines="keep"), "pre"),
    "visionzip_fixed_drop": (lambda b: pn.next_options(R.visionzip.for_budget(b), crop_split="fixed",
                                                       newlines="drop"), "pre"),
    "visiondrop_vision": (lambda b: VisionDropVision.for_budget(b), "pre"),
    "adafv": (lambda b: R.adafv(b), "pre"),
    "divprune": (lambda b: R.divprune(b), "pre"),
    "consensusdrop_keep": (lambda b: pn.next_options(R.consensusdrop(b), newlines="keep"), "pre"),
    "random_prune": (lambda b: R.random_prune(b), "pre"),
    "uniform_per_crop_drop": (lambda b: pn.next_options(R.uniform(b), per_crop=True, newlines="drop"), "pre"),
    "fastv_keep": (lambda b: pn.next_options(R.fastv(layer=1, keep=2 * b), newlines="keep"), "llm"),
    "pyramiddrop": (_pdrop, "llm"),
    "dart": (lambda b: R.dart(layer=1, keep=2 * b), "llm"),
    "adsc_drop": (lambda b: pn.next_options(R.adsc((1, 2), (3 * b, 2 * b)), newlines="drop"), "llm"),
}
CASES = [pytest.param(name, key, marks=() if key == "320" else pytest.mark.slow, id=f"{name}-{key}")
         for name in MATRIX for key in BUDGETS]


def _final_visual(spec, b: int) -> int:
    """Visual tokens per row the last in-LLM cut keeps."""
    inner = spec.reducer if isinstance(spec, pn.NextOptions) else spec
    last = as_tuple(inner)[-1]
    return last.output_visual(10 ** 6) if hasattr(last, "output_visual") else None


def check_pre_llm(out, lay, n_text, spec, st):
    """Never padding; newline policy; order; valid sequence length = text + valid visual tokens."""
    kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
    assert kept.shape == (4, st.S)
    for n in range(4):
        k = kept[n][kv[n]]
        sp = k[k >= 0]
        assert lay.valid[n, sp].all(), "a padding slot reached the LLM"
        nl = lay.is_newline[n, sp]
        content = len(k) - nl.sum()
        assert content <= st.V if st.newlines == "keep" else len(k) <= st.S
        if st.newlines == "drop" or st.mode in ("vision", "per_crop") and st.newlines == "prune":
            assert not nl.any()
        if st.newlines == "keep":  # a kept newline <=> its row keeps a placed tile token (vision: =>)
            rows_hit = {int(pn_) for pn_ in _row_newline(lay, n, sp[~nl])}
            kept_nl = set(sp[nl].tolist())
            assert kept_nl <= rows_hit
            if st.mode != "vision":
                assert kept_nl == rows_hit
        if st.mode == "vision":  # the official VisionZip NeXT order (families/llava_next docstring)
            _check_vision_order(k, int(lay.num_crops[n]))
        else:  # packed (HF) order, AdaFV duplicates adjacent
            assert (np.diff(sp) >= 0).all()
    valid = np.asarray(out.attention_mask)
    assert (valid.sum(1) == n_text + kv.reshape(2, -1).sum(1)).all()


def _check_vision_order(k, n_crops: int):
    """``[base: CLS, its dominant + contextual patches] [tile dominant patches + newlines, packed order]
    [tile CLS x (n_crops - 1)] [tile contextual]``; every real crop keeps its CLS (kept = -1), padded ones none."""
    assert k[0] == -1 and (k < 0).sum() == n_crops
    first_tile = int(np.argmax(k >= P))
    assert k[first_tile] >= P and ((k[1:first_tile] >= 0) & (k[1:first_tile] < P)).all()
    cls = np.flatnonzero(k < 0)[1:]
    assert (np.diff(cls) == 1).all() and cls[0] > first_tile
    assert (np.diff(k[first_tile:cls[0]]) > 0).all()  # global raster over the tile grid, newlines in place
    assert (k[cls[-1] + 1:] >= P).all()


def _row_newline(lay, n, packed):
    nlpos = np.flatnonzero(lay.valid[n] & lay.is_newline[n])
    tile = packed[lay.crop[n, packed] >= 1]
    return nlpos[np.searchsorted(nlpos, tile)]


@pytest.mark.parametrize("name,key", CASES)
def test_every_reducer_on_mixed_aspect_batch(name, key):
    build, kind = MATRIX[name]
    b = BUDGETS[key]
    spec = build(b)
    out, lay, n_text = run(spec)
    inner, opts = pn.unwrap(spec)
    st = pn.build_static(CFG, as_tuple(inner), opts, 2)
    logits, valid = np.asarray(out.logits), np.asarray(out.attention_mask)
    assert np.isfinite(logits[valid]).all()
    assert valid[:, -1].all()  # left-padded input: every row's last token sits in the last column
    if kind == "pre":
        check_pre_llm(out, lay, n_text, spec, st)
        return
    # in-LLM: the pool is the padded static span; padding is never selected, so exactly the budget survives
    nl = (lay.valid & lay.is_newline).reshape(2, 2, -1).sum((1, 2))
    keep = _final_visual(spec, b)
    if name == "dart":  # 4 image pivots + (4 image + the valid text pivots) x keep // 8 each
        dart = pn.unwrap(spec)[0]
        keep = dart.pivot_image + (dart.pivot_image + np.minimum(dart.pivot_text, batch.trailing)) * dart.token_topk
    extra = nl if opts.newlines == "keep" else 0
    assert (valid.sum(1) == n_text + keep + extra).all(), (valid.sum(1), n_text, keep, extra)


# ---------------------------------------------------------------------------------------------------
def test_noop_reductions_reproduce_the_plain_forward():
    """Budgets that keep everything give exactly the unreduced NeXT logits (which match HF, test_next_parity):
    the canonical sequence, the packing order (global and per crop, base raster then the unpadded tile grid
    row-major) and the newline placement are all exact."""
    m = model()
    ids, mask, px, sizes, _ = batch(MIXES[1], seed=3)
    plain = np.asarray(m(ids, px, attention_mask=mask, image_sizes=sizes).logits)
    want = [plain[r][mask[r].astype(bool)] for r in range(2)]
    for spec in (pn.next_options(R.fastervlm(FULL), newlines="keep"), R.fastervlm(GEOM.max_tokens),
                 pn.next_options(R.fastervlm(FULL), per_crop=True, crop_split="fixed", newlines="keep")):
        out = m(ids, px, attention_mask=mask, image_sizes=sizes, reducer=spec)
        lg, v = np.asarray(out.logits), np.asarray(out.attention_mask)
        for r in range(2):
            np.testing.assert_allclose(lg[r][v[r]], want[r], atol=1e-5, rtol=0)


def test_one_compile_per_budget_for_mixed_aspect_batches():
    m = model()
    for name in ("fastervlm", "visionzip", "fastv_keep"):  # global, per crop ('real' variants), in-LLM
        spec = MATRIX[name][0](BUDGETS["320"])
        run(spec, MIXES[0])
        fn = m.programs.forward
        before = fn._cache_size()
        for s, names in enumerate(MIXES[1:]):
            out, _, _ = run(spec, names, seed=10 + s)
            assert np.isfinite(np.asarray(out.logits)[np.asarray(out.attention_mask)]).all()
        assert fn._cache_size() == before


def test_generate_with_pre_and_in_llm_reducers():
    ids, mask, px, sizes, _ = batch(MIXES[2], seed=5)
    spec = R.compose(R.visionzip.for_budget(BUDGETS["320"]), R.fastv(layer=2, keep=BUDGETS["160"]))
    toks = np.asarray(model().generate(ids, px, attention_mask=mask, image_sizes=sizes, reducer=spec,
                                       max_new_tokens=3, eos_token_id=(), pad_token_id=0))
    assert toks.shape == (2, 3) and ((toks >= 0) & (toks < VOCAB)).all()


# ---------------------------------------------------------------------------------------------------
def _tables(names):
    lay = build_layout(GEOM, [SIZES[n] for n in names])
    st = pn.build_static(CFG, (R.adafv(20),), pn.NextOptions(R.adafv(20)), 1)
    return lay, st, {k: jnp.asarray(v) for k, v in pn.layout_tables(lay, st).items()}


def test_adafv_cls_picks_land_on_their_own_crop():
    """Each crop's CLS attention peaks on one patch; AdaFV (global, quota 5 of 20 per signal) must keep that
    patch *of that crop*. The official AdaV NeXT code maps crop c's pick j to flat index j + c (not
    j + c * 576), i.e. to a base-crop token: the assertions below fail under that mapping."""
    names = ["square", "tall"]
    lay, st, A = _tables(names)
    N, heads, H = 2, 2, 8
    rng = np.random.default_rng(0)
    cls = np.full((N * C, heads, P), 1e-3, np.float32)
    peaks = {}
    for n in range(N):
        for c in range(int(lay.num_crops[n])):
            inside = np.flatnonzero(lay.valid[n] & (lay.crop[n] == c))  # packed tokens of crop c (unpadded)
            m_ = int(inside[(7 * c + 3) % len(inside)])
            j = int(lay.row[n, m_] * GEOM.grid + lay.col[n, m_])
            cls[n * C + c, :, j] = 0.5
            peaks[(n, c)] = (m_, j)
    z = np.zeros
    feats = rng.standard_normal((N * C, P, H)).astype(np.float32)
    te, tv = z((N, 4, H), np.float32), np.ones((N, 4), bool)  # zero text: T2I carries no information

    @jax.jit
    def pick(feats, cls, A):
        ctx = pn.span_context(st, A, feats, z((N * C, P, 4), np.float32), cls, z((N * C, P, heads, 2), np.float32),
                              jnp.ones((H,)), te, tv)
        red = R.adafv(20)(ctx)
        return jnp.where(red.valid, jnp.take_along_axis(A["span_packed"], red.index, axis=1), -1)

    got = np.asarray(pick(feats, cls, A))
    for (n, c), (m_, j) in peaks.items():
        assert m_ in got[n], (n, c, m_)
        # the kept token is crop c's patch j; the official mapping reads flat index j + c, i.e.
        # (crop, patch) = divmod(j + c, P), which is another token for every crop after the base
        assert (lay.crop[n, m_], lay.row[n, m_] * GEOM.grid + lay.col[n, m_]) == (c, j)
        assert c == 0 or divmod(j + c, P) != (c, j)


def test_layout_tables():
    names = ["tall", "wide", "square", "cutsq"]
    lay = build_layout(GEOM, [SIZES[n] for n in names])
    for newlines, S_full in (("keep", FULL + 16), ("prune", GEOM.max_tokens), ("drop", FULL)):
        spec = pn.next_options(R.fastv(layer=1, keep=8), newlines=newlines)
        st = pn.build_static(CFG, (spec.reducer,), spec, 1)
        assert (st.S_full, st.NL, st.M) == (S_full, 16, 64 + 16 * 17)
        t = pn.layout_tables(lay, st)
        for n in range(4):
            real = lay.valid[n]
            sp = t["span_packed"][n]
            want = np.flatnonzero(real & ~lay.is_newline[n]) if newlines == "drop" else np.flatnonzero(real)
            np.testing.assert_array_equal(sp[sp >= 0], want)
            pp = t["patch_packed"][n]
            ok = pp >= 0
            np.testing.assert_array_equal(lay.gather_index[n, pp[ok]], np.flatnonzero(ok))  # inverse map
            assert ok.sum() == (real & ~lay.is_newline[n]).sum()
            assert not ok.reshape(C, P)[lay.num_crops[n]:].any()  # padded crops have no token
            nls = t["nl_slots"][n][t["nl_slots"][n] >= 0]
            assert lay.is_newline[n, nls].all() and len(nls) == (real & lay.is_newline[n]).sum()
            tile = np.flatnonzero(real & (lay.crop[n] >= 1))
            nlo = t["nl_of"][n, tile]
            assert (nlo > tile).all() and lay.is_newline[n, nlo].all()  # the newline closing the row
            # same row: no other newline between a token and its row's newline
            assert all(not lay.is_newline[n, a:b].any() for a, b in zip(tile, nlo))


def test_budget_conventions_llava_v16():
    """llava-v1.6 geometry: 2880 = 5 x 576 'full' pool, 2928 packed max, 72 newline rows (1x3 grids); VisionZip
    640 / 320 / 160 split per crop as the LLaVA-1.5 splits of 128 / 64 / 32 (crop_split='fixed' and 5-crop
    images under 'real'), 3- and 4-crop images get budget // n_crops under 'real'."""
    cfg = dataclasses.replace(LlavaConfig(), model_type="llava_next", image_grid_pinpoints=V16_PINS)
    for total, per in ((640, (108, 20)), (320, (54, 10)), (160, (27, 5))):
        vz = R.visionzip.for_budget(total)
        fixed = pn.build_static(cfg, (vz,), pn.NextOptions(vz, crop_split="fixed", newlines="drop"), 1)
        assert fixed.variants == ((0, (R.visionzip(*per),)),) and fixed.S == 5 * sum(per)
        real = pn.build_static(cfg, (vz,), pn.NextOptions(vz, newlines="keep"), 1)
        assert [n for n, _ in real.variants] == [3, 4, 5] and real.variants[-1][1] == (R.visionzip(*per),)
        assert [sum(dataclasses.astuple(s[0])) for _, s in real.variants] == [total // 3, total // 4, total // 5]
        assert real.S == total + 72 and real.V == total  # + the newline slots of 'keep'
        default = pn.build_static(cfg, (vz,), pn.NextOptions(vz), 1)
        assert default.S == default.V == total  # 'prune': exactly the budget
    fv = R.fastv(layer=2, keep=640)
    st = pn.build_static(cfg, (fv,), pn.next_options(fv, newlines="keep"), 1)
    assert (st.V, st.S_full, st.M, st.NL) == (2880, 2880 + 72, 2928, 72)
    st = pn.build_static(cfg, (fv,), pn.next_options(fv), 1)
    assert st.V == st.S_full == 2928
    assert pn.visual_pool(cfg) == 2928 and pn.visual_pool(cfg, "keep") == pn.visual_pool(cfg, "drop") == 2880
    assert pn.per_crop_spec(R.fastervlm(640), 5) == R.fastervlm(128)
    assert pn.per_crop_spec(R.pool2x2(), 5) == R.pool2x2()


def test_refusals():
    m = model()
    ids, mask, px, sizes, _ = batch(MIXES[0])
    call = functools.partial(m, ids, px, attention_mask=mask, image_sizes=sizes)
    with pytest.raises(NotImplementedError, match="vision-stage and a projector-stage"):
        call(reducer=R.compose(R.visionzip(10, 2), R.fastervlm(8)))
    with pytest.raises(BudgetError, match="per_crop=True"):
        call(reducer=R.pool2x2())
    with pytest.raises(BudgetError, match="FastV.keep"):
        call(reducer=R.fastv(layer=1, keep=2 * GEOM.max_tokens + 1))
    with pytest.raises(BudgetError, match="per crop"):
        call(reducer=pn.next_options(R.visionzip(3, 1), crop_split="fixed"))
    with pytest.raises(ValueError, match="newlines"):
        pn.next_options(R.fastervlm(8), newlines="sometimes")
    with pytest.raises(ValueError, match="crop_split"):
        pn.next_options(R.fastervlm(8), crop_split="even")
    with pytest.raises(ValueError, match="cannot wrap"):
        pn.next_options(pn.next_options(R.fastervlm(8)))
    llava = jp.Llava.random(dataclasses.replace(CFG, model_type="llava", image_grid_pinpoints=()), seed=0)
    with pytest.raises(ValueError, match="llava_next models"):
        llava(np.full((1, 64), IMG), np.zeros((1, 3, 32, 32), np.float32), reducer=pn.next_options(R.fastervlm(8)))
