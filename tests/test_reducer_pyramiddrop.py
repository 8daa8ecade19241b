"""PyramidDrop == NumPy transcription of ``pdrop_rank_drop`` (Cooperx521/PyramidDrop @ 6444f30) on random
contexts; batching, traces, callbacks; a full-attention NumPy reference of every cut on the e2e model;
end to end; schedules and errors."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.engine import decoder as gen
from jaxprune.reducers import BudgetError, compose
from jaxprune.reducers.llm import LLMContext, next_q_index
from tests.reducer_testlib import run_forward
from jaxprune.reducers.pyramiddrop import (PyramidDropCut, average_visual_tokens, pyramiddrop,
                                           pyramiddrop_for_average, scale_layers)
from tests.reducer_testlib import E2E_CFG, assert_no_callbacks, e2e_model, make_batch

P = E2E_CFG.tokens_per_image  # 144


# ---------------------------------------------------------------------------------------------------
# random in-LLM contexts
def random_llm_context(seed: int, B: int = 1, V: int = 24, prefix: int = 3, n_text=None, vis_valid=None,
                       padding: str = "left", N: int = 4, Kv: int = 2, hd: int = 8, H: int = 16) -> LLMContext:
    """Rows ``[pad] prefix | V visual slots | text [pad]`` with random hidden states and next-layer q/k.
    ``vis_valid[i]`` = number of valid visual slots of row i (the others, at random places, are invalid)."""
    rng = np.random.default_rng(seed)
    n_text = [int(x) for x in rng.integers(2, 7, B)] if n_text is None else list(n_text)
    T = prefix + V + max(6, *n_text)  # one static length for the default text lengths
    valid = np.zeros((B, T), bool)
    vis_idx = np.zeros((B, V), np.int32)
    vis_ok = np.ones((B, V), bool)
    for i in range(B):
        L = prefix + V + n_text[i]
        off = T - L if padding == "left" else 0
        valid[i, off:off + L] = True
        vis_idx[i] = off + prefix + np.arange(V)
        if vis_valid is not None and vis_valid[i] < V:
            bad = rng.choice(V, V - vis_valid[i], replace=False)
            vis_ok[i, bad] = False
            valid[i, vis_idx[i, bad]] = False
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    last = np.max(np.where(valid, np.arange(T)[None], 0), axis=1).astype(np.int32)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return LLMContext(hidden=f(B, T, H), valid=jnp.asarray(valid), positions=jnp.asarray(pos),
                      visual_index=jnp.asarray(vis_idx), visual_valid=jnp.asarray(vis_ok),
                      last_index=jnp.asarray(last), prev_q=f(B, T, N, hd), prev_k=f(B, T, Kv, hd),
                      next_q=f(B, T, N, hd), next_k=f(B, T, Kv, hd), normed=f(B, T, H))


def for_spec(ctx: LLMContext, spec) -> LLMContext:
    """The context the machinery hands ``spec``: ``next_q`` holds only the rows it declares (``next_q_rows``);
    the random contexts above carry every row (the NumPy references read them from there)."""
    idx = next_q_index(spec.next_q_rows, ctx.last_index, ctx.visual_index)
    if idx is None:
        return ctx
    return dataclasses.replace(ctx, next_q=jnp.take_along_axis(ctx.next_q, idx[..., None, None], axis=1))


# ---------------------------------------------------------------------------------------------------
# NumPy transcription of the official selection (inference branch of pdrop_rank_drop, one row)
def official_rank_drop(q, k, image_index: int, image_tokens: int, prompt_total_len: int, keep: int):
    """``q [T, N, hd]``, ``k [T, Kv, hd]``: post-RoPE q/k of layer ``rank_layer`` on the row's valid tokens
    (the official code drops padding first). Returns the kept positions relative to ``image_index``
    (``topk(...).indices.sort()``; ties to the lower index) and the scores."""
    q = np.asarray(q, np.float64).transpose(1, 0, 2)  # [N, T, hd]
    k = np.asarray(k, np.float64).transpose(1, 0, 2)  # [Kv, T, hd]
    N, T, hd = q.shape
    k = np.repeat(k, N // k.shape[0], axis=0)  # repeat_kv
    text_query_states = q[:, prompt_total_len - 1, :][:, None, :]  # [N, 1, hd]
    causal = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], 0.0, -np.inf)  # eager mask
    text_mask = causal[prompt_total_len - 1][None, None, :]
    attn = text_query_states @ k.transpose(0, 2, 1) / np.sqrt(hd) + text_mask  # [N, 1, T]
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    avg_head = attn.mean(0)[:, image_index:image_index + image_tokens]  # [1, n]
    avg_text = avg_head.mean(0)  # [n]
    order = sorted(range(image_tokens), key=lambda j: (-avg_text[j], j))
    return np.sort(np.asarray(order[:keep], int)), avg_text


def official_row(ctx: LLMContext, i: int, keep: int):
    """Run the transcription on row ``i`` of a context (valid tokens only). Returns the kept pool slots
    and the minimal score gap at the top-``keep`` boundary."""
    valid = np.asarray(ctx.valid[i])
    seq = np.flatnonzero(valid)  # compacted sequence -> slots
    vis_slots = np.asarray(ctx.visual_index[i])[np.asarray(ctx.visual_valid[i])]
    pool = np.flatnonzero(np.asarray(ctx.visual_valid[i]))
    image_index = int(np.searchsorted(seq, vis_slots[0]))
    n_img = len(vis_slots)
    assert (seq[image_index:image_index + n_img] == vis_slots).all()
    kept, s = official_rank_drop(np.asarray(ctx.next_q[i])[seq], np.asarray(ctx.next_k[i])[seq], image_index,
                                 n_img, len(seq), min(keep, n_img))
    srt = np.sort(s)[::-1]
    gap = srt[min(keep, n_img) - 1] - srt[min(keep, n_img)] if keep < n_img else np.inf
    return pool[kept], gap


SPEC = PyramidDropCut(layer=2, keep=9)
run_spec = jax.jit(lambda c: SPEC(for_spec(c, SPEC)))  # shared by the tests below (one compile per input shape)


def test_official_transcription_50_seeds():
    spec, f = SPEC, run_spec
    for seed in range(50):
        ctx = random_llm_context(seed, B=1, padding=("left", "right")[seed % 2])
        out = f(ctx)
        want, gap = official_row(ctx, 0, spec.keep)
        assert gap > 1e-6, (seed, gap)  # tie-free
        np.testing.assert_array_equal(np.asarray(out.slots[0]), want, err_msg=f"seed {seed}")
        assert np.asarray(out.valid).all()
        hid = np.asarray(ctx.visual_hidden[0])[want]
        np.testing.assert_allclose(np.asarray(out.tokens[0]), hid, atol=1e-6)


def test_batched_equals_rows_and_official():
    spec = SPEC
    ctx = random_llm_context(7, B=4, vis_valid=[24, 17, 6, 12], padding="left")
    full = run_spec(ctx)
    for i in range(4):
        one = run_spec(jax.tree.map(lambda x, i=i: x[i:i + 1], ctx))  # same shapes as the 50-seed test
        np.testing.assert_array_equal(np.asarray(full.slots[i]), np.asarray(one.slots[0]))
        np.testing.assert_array_equal(np.asarray(full.valid[i]), np.asarray(one.valid[0]))
        np.testing.assert_allclose(np.asarray(full.tokens[i]), np.asarray(one.tokens[0]), atol=1e-6)
        want, _ = official_row(ctx, i, spec.keep)
        ok = np.asarray(full.valid[i])
        assert ok.sum() == min(spec.keep, int(np.asarray(ctx.visual_valid[i]).sum()))
        np.testing.assert_array_equal(np.asarray(full.slots[i])[ok], want)
        assert len(set(np.asarray(full.slots[i]).tolist())) == spec.keep  # distinct slots, even unfilled ones


def test_one_trace_and_no_callbacks():
    spec = PyramidDropCut(layer=1, keep=6)
    chex.clear_trace_counter()
    f = jax.jit(chex.assert_max_traces(lambda c: spec(for_spec(c, spec)), n=1))
    for s in range(20):
        jax.block_until_ready(f(random_llm_context(100 + s, B=2, n_text=[3, 5])).tokens)
    assert_no_callbacks(spec, for_spec(random_llm_context(0, B=2, n_text=[3, 5]), spec))


# ---------------------------------------------------------------------------------------------------
# Full-attention NumPy reference on the e2e model (q/k sharpened so that ranks are well separated)
@functools.lru_cache(maxsize=1)
def sharp_model() -> jp.Llava:
    """The e2e model with its decoder q/k projections scaled by 6 (sharper, well-separated attention)."""
    flat = dict(e2e_model().flat_params())
    for name in list(flat):
        if name.startswith("language.") and (".q_proj." in name or ".k_proj." in name):
            flat[name] = flat[name] * 6.0
    return jp.Llava.from_params(E2E_CFG, flat)


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + E2E_CFG.text.rms_norm_eps) * scale


def np_qkv(flat, layer: int, h, pos):
    """Layer ``layer``'s post-RoPE q/k and v of one row's hidden states ``h [T, H]`` at ``pos [T]`` (NumPy)."""
    t = E2E_CFG.text
    pre = f"language.layers.{layer}."
    x = _rms(np.asarray(h, np.float64), flat[pre + "input_layernorm.scale"])
    q = (x @ flat[pre + "self_attn.q_proj.kernel"]).reshape(len(x), t.num_attention_heads, -1)
    k = (x @ flat[pre + "self_attn.k_proj.kernel"]).reshape(len(x), t.num_key_value_heads, -1)
    v = (x @ flat[pre + "self_attn.v_proj.kernel"]).reshape(len(x), t.num_key_value_heads, -1)
    hd = q.shape[-1]
    inv = 1.0 / t.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = lambda a: np.concatenate([-a[..., hd // 2:], a[..., :hd // 2]], -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin, v


def np_layer(flat, layer: int, h):
    """One decoder layer on one row's valid tokens (positions ``arange``), full causal attention."""
    pre = f"language.layers.{layer}."
    q, k, v = np_qkv(flat, layer, h, np.arange(len(h)))
    n, hd = q.shape[1], q.shape[2]
    k, v = np.repeat(k, n // k.shape[1], axis=1), np.repeat(v, n // v.shape[1], axis=1)
    a = np.einsum("tnh,snh->nts", q, k) / np.sqrt(hd)
    a = np.where(np.tril(np.ones((len(h), len(h)), bool))[None], a, -np.inf)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", a, v).reshape(len(h), n * hd)
    h = h + o @ flat[pre + "self_attn.o_proj.kernel"]
    x = _rms(h, flat[pre + "post_attention_layernorm.scale"])
    g = x @ flat[pre + "mlp.gate_proj.kernel"]
    return h + ((g / (1 + np.exp(-g))) * (x @ flat[pre + "mlp.up_proj.kernel"])) @ flat[pre + "mlp.down_proj.kernel"]


def llm_inputs(model, ids, mask, px):
    """Each row's LLM input (valid tokens only, all 144 image features from the jitted vision tower) and
    its image mask."""
    from flax import nnx

    emb = model.flat_params()["language.embed_tokens.embedding"]
    feats = np.asarray(jax.jit(lambda p, x: nnx.merge(model.graphdef, p).image_features(x))(
        model.params, jnp.asarray(px)))  # [B, P, H]
    rows = []
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].astype(bool)]
        is_img = row == E2E_CFG.image_token_index
        h = emb[np.where(is_img, 0, row)]
        h[is_img] = feats[i]
        rows.append((h, is_img))
    return rows


def reference_rows(model, rows, cuts, select):
    """The official prefill, row by row in NumPy (float64) on each row's valid tokens ``rows = [(h, is_img)]``
    (:func:`llm_inputs`): decoder layers, ``select(q, k, h, image_index, n_img, layer_spec) -> (new visual
    tokens, kept)`` after each cut's layer (q/k of the next layer recomputed from the parameters), contiguous
    re-numbering. Returns the logits of each row's valid tokens and the kept lists."""
    flat = {k: np.asarray(v, np.float64) for k, v in model.flat_params().items()}
    n_layers = E2E_CFG.text.num_hidden_layers
    out, kept_all = [], []
    for h, is_img in rows:
        h = np.asarray(h, np.float64)
        img = np.flatnonzero(is_img)
        assert (np.diff(img) == 1).all()
        image_index, n_img = int(img[0]), len(img)
        start, kept_row = 0, []
        for r in list(cuts.reducers) + [None]:
            stop = n_layers if r is None else r.layer
            for layer in range(start, stop):
                h = np_layer(flat, layer, h)
            if r is None:
                break
            q, k, _ = np_qkv(flat, r.layer, h, np.arange(len(h)))
            new, kept = select(q, k, h, image_index, n_img, r)
            kept_row.append(kept)
            h = np.concatenate([h[:image_index], new, h[image_index + n_img:]])
            n_img = len(new)
            start = stop
        out.append(_rms(h, flat["language.norm.scale"]) @ flat["lm_head.kernel"])
        kept_all.append(kept_row)
    return out, kept_all


def pdrop_select(q, k, h, image_index, n_img, r):
    kept, s = official_rank_drop(q, k, image_index, n_img, len(h), r.keep)
    srt = np.sort(s)[::-1]
    assert srt[r.keep - 1] - srt[r.keep] > 1e-4 * srt[0], "near tie in the reference scores"
    return h[image_index + kept], kept


def test_full_attention_reference_and_end_to_end():
    m = sharp_model()
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=3)
    r = pyramiddrop((1, 2, 3), (0.5, 0.25, 0.125), total=P)
    assert [(c.layer, c.keep) for c in r.reducers] == [(1, 72), (2, 36), (3, 18)]
    out = run_forward(m, ids, px, mask, None, r)
    T = ids.shape[1]
    assert out.logits.shape == (3, T - P + 18, 128)
    lg, v = np.asarray(out.logits), np.asarray(out.attention_mask)
    assert np.isfinite(lg[v]).all()
    ref, _ = reference_rows(m, llm_inputs(m, ids, mask, px), r, pdrop_select)
    for i in range(3):
        assert v[i].sum() == len(ref[i]) == 2 + 18 + [4, 9, 6][i]
        np.testing.assert_allclose(lg[i][v[i]], ref[i], atol=2e-4, rtol=1e-4)
    toks = np.asarray(m.generate(ids, px, attention_mask=mask, reducer=r, max_new_tokens=16, eos_token_id=()))
    assert toks.shape == (3, 16) and ((toks >= 0) & (toks < 128)).all()
    # the first generated token is the argmax of the forward's last valid logits
    last = np.asarray(gen.last_valid_index(jnp.asarray(v)))
    np.testing.assert_array_equal(toks[:, 0], lg[np.arange(3), last].argmax(-1))


# ---------------------------------------------------------------------------------------------------
# schedules
def test_official_counts_are_relative_to_the_original_count():
    r = pyramiddrop()  # --layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125] on 576 tokens
    assert [(c.layer, c.keep) for c in r.reducers] == [(8, 288), (16, 144), (24, 72)]
    assert average_visual_tokens(576, (8, 16, 24), (288, 144, 72), 32) == 270.0
    r = pyramiddrop((2, 3), (0.3, 0.1), total=100)  # int() truncation of N0 * r, not of the current count
    assert [c.keep for c in r.reducers] == [30, 10]


@pytest.mark.parametrize("budget,keeps,avg", [(192, (322, 180, 100), 191.375), (128, (241, 101, 42), 127.4375),
                                               (64, (110, 21, 4), 63.875)])
def test_for_average(budget, keeps, avg):
    r = pyramiddrop.for_average(budget)
    assert [c.layer for c in r.reducers] == [2, 8, 16]
    assert tuple(c.keep for c in r.reducers) == keeps
    assert average_visual_tokens(576, (2, 8, 16), keeps, 32) == avg
    assert abs(avg - budget) < 1.0
    lam = keeps[0] / 576
    assert abs(keeps[1] - 576 * lam ** 2) < 2 and abs(keeps[2] - 576 * lam ** 3) < 2  # pyramid lambda^s


def test_for_average_scaled_and_author_example():
    assert scale_layers((2, 8, 16), 4) == (1, 2, 3)
    r = pyramiddrop_for_average(48, num_layers=4, total=P)
    assert [(c.layer, c.keep) for c in r.reducers] == [(1, 36), (2, 9), (3, 2)]
    # issue #29: layer_list [2, 8, 16] and lambda = 0.19 give ~64 tokens
    assert abs(average_visual_tokens(576, (2, 8, 16), [int(576 * 0.19 ** s) for s in (1, 2, 3)], 32) - 64) < 1.5
    with pytest.raises(BudgetError, match="not reachable"):
        pyramiddrop_for_average(128, layers=(8, 16, 24))  # >= 144 with the released layers (issue #10)
    with pytest.raises(BudgetError, match="not reachable"):
        pyramiddrop_for_average(32, num_layers=4, total=P)
    # 8 layers: cuts after 1 / 2 / 4; the first layer alone averages 576 / 8 = 72, and the last stage keeps >= 1
    with pytest.raises(BudgetError, match=r"averages lie in \[83.2, 576\).*deeper decoder is needed"):
        pyramiddrop_for_average(64, num_layers=8)
    assert pyramiddrop_for_average(84, num_layers=8).reducers[-1].keep >= 1
    assert [c.keep for c in pyramiddrop_for_average(64, num_layers=32).reducers] == [110, 21, 4]


@pytest.mark.parametrize("make,match", [
    (lambda: pyramiddrop((8, 16, 24), (0.5, 0.6, 0.1)), r"grows the visual token count \(288 -> 345\)"),
    (lambda: pyramiddrop((8, 8, 24)), r"strictly increasing"),
    (lambda: pyramiddrop((16, 8, 24)), r"strictly increasing"),
    (lambda: pyramiddrop((8, 16), (0.5, 0.25, 0.1)), r"2 layers but 3 ratios"),
    (lambda: pyramiddrop((8,), (1.5,)), r"ratios must be in \(0, 1\]"),
    (lambda: pyramiddrop((8,), (0.001,)), r"at least one token"),
    (lambda: PyramidDropCut(layer=0, keep=4), r"layer=0 is outside"),
    (lambda: PyramidDropCut(layer=2, keep=0), r"keep=0 must be > 0"),
])
def test_schedule_errors(make, match):
    with pytest.raises(BudgetError, match=match):
        make()


@pytest.mark.parametrize("spec,match", [
    (lambda: compose(PyramidDropCut(1, 20), PyramidDropCut(2, 30)), r"larger than the 20 tokens"),
    (lambda: compose(PyramidDropCut(2, 20), PyramidDropCut(2, 10)), r"strictly increasing"),
    (lambda: PyramidDropCut(4, 10), r"layer=4 is outside \[1, 4\)"),
    (lambda: pyramiddrop((1, 2, 3), total=576), r"larger than the 144 tokens"),
])
def test_model_errors(spec, match):
    m = e2e_model()
    ids, mask, px = make_batch([4, 9, 6], P, 100, 128, 24, padding="left", seed=0)
    with pytest.raises(BudgetError, match=match):
        m(ids, px, attention_mask=mask, reducer=spec())
