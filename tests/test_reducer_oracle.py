"""The synthvqa ``oracle`` reducer: its rule against NumPy, end to end through ``reducer_inputs``, one compile per
budget, refusals (no inputs, another family, another benchmark), and the patch prior from the scene generator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.engine.reducer_inputs import check_reducer_inputs
from jaxprune.eval.synthvqa.dataset import make_item
from jaxprune.eval.synthvqa.export import question_id
from jaxprune.eval.synthvqa.scene import COLOUR_NAMES, SHAPES, render
from jaxprune.eval.synthvqa.targets import patch_prior, prior_for_question_id
from jaxprune.inputs import InputError
from jaxprune.reducers import registry
from jaxprune.reducers.oracle import Oracle, oracle, oracle_indices
from tests.conftest import make_batch
from tests.reducer_testlib import (E2E_CFG, assert_no_callbacks, e2e_model, forward_cache_size,
                                   random_projector_context)

P = E2E_CFG.vision.num_patches  # 144


def numpy_oracle(prior: np.ndarray, valid: np.ndarray, k: int) -> tuple[list[int], int]:
    """One row, the docstring's rule written plainly: (kept indices ascending, number of valid slots)."""
    tgt = [j for j in range(len(prior)) if valid[j] and prior[j] > 0]
    tgt = sorted(tgt, key=lambda j: (-prior[j], j))[:k]
    rest = [j for j in range(len(prior)) if valid[j] and not prior[j] > 0]
    r = min(k - len(tgt), len(rest))
    fill = [rest[(i * len(rest)) // r] for i in range(r)] if r > 0 else []
    kept = sorted(tgt + fill)
    return kept, len(kept)


@pytest.mark.parametrize("k", [1, 5, 16, 48, 143, 144])
def test_indices_equal_the_numpy_rule(k):
    rng = np.random.default_rng(k)
    n = 6
    prior = np.zeros((n, P), np.float32)
    for i, n_t in enumerate([0, 4, 9, 30, 60, 144]):
        prior[i, rng.choice(P, n_t, replace=False)] = rng.choice([0.5, 1.0, 2.0], n_t)
    valid = np.ones((n, P), bool)
    valid[2, 100:] = False
    valid[4, rng.choice(P, 40, replace=False)] = False
    idx, ok = jax.jit(oracle_indices, static_argnums=2)(jnp.asarray(prior), jnp.asarray(valid), k)
    idx, ok = np.asarray(idx), np.asarray(ok)
    for i in range(n):
        want, nv = numpy_oracle(prior[i], valid[i], k)
        assert ok[i].sum() == nv
        assert idx[i][ok[i]].tolist() == want, i


def test_keeps_exactly_the_asked_patches_when_the_budget_equals_their_count():
    ctx = random_projector_context(3, seed=1)
    prior = np.zeros((3, P), np.float32)
    asked = [[0, 1, 12, 13], [50, 51, 62, 63, 70], [140, 141, 142, 143]]
    for i, a in enumerate(asked):
        prior[i, a] = 1.0
    ctx = dataclasses.replace(ctx, inputs={"patch_prior": jnp.asarray(prior)})
    for i, a in enumerate(asked):
        red = jax.jit(Oracle(budget=len(a)))(jax.tree.map(lambda x: x[i:i + 1], ctx))
        assert np.asarray(red.index[0]).tolist() == a
        np.testing.assert_array_equal(np.asarray(red.tokens[0]), np.asarray(ctx.features[i, a]))
    red = jax.jit(Oracle(budget=16))(ctx)
    for i, a in enumerate(asked):  # a larger budget keeps all of them, plus evenly spread others
        kept = np.asarray(red.index[i]).tolist()
        assert set(a) <= set(kept) and len(kept) == 16 and kept == sorted(kept)
    assert_no_callbacks(Oracle(budget=16), ctx)


def _batch(seed: int, n: int = 3):
    ids, mask, px = make_batch([4, 9, 6][:n], P, E2E_CFG.image_token_index, 128, E2E_CFG.vision.image_size,
                               padding="left", seed=seed)
    rng = np.random.default_rng(seed)
    prior = np.zeros((n, P), np.float32)
    for i in range(n):
        prior[i, rng.choice(P, int(rng.integers(0, 12)), replace=False)] = 1.0
    return ids, mask, px, prior


def test_end_to_end_keeps_the_asked_patches_and_compiles_once_per_budget():
    m = e2e_model()
    before = forward_cache_size(m)
    for budget in (16, 8):
        for seed in range(3):
            ids, mask, px, prior = _batch(seed)
            out = m(ids, px, attention_mask=mask, reducer=oracle(budget), reducer_inputs={"patch_prior": prior})
            kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
            for i in range(3):
                want, _ = numpy_oracle(prior[i], np.ones(P, bool), budget)
                assert kept[i][kv[i]].tolist() == want
                asked = np.flatnonzero(prior[i])
                if len(asked) <= budget:
                    assert set(asked.tolist()) <= set(kept[i].tolist())
            assert np.isfinite(np.asarray(out.logits)[np.asarray(out.attention_mask)]).all()
    assert forward_cache_size(m) - before == 2  # one program per budget, whatever the priors
    toks = m.generate(ids, px, attention_mask=mask, reducer=oracle(8), reducer_inputs={"patch_prior": prior},
                      max_new_tokens=3)
    assert np.asarray(toks).shape == (3, 3)


def test_composed_after_another_pre_llm_reducer_reads_each_slots_source_prior():
    m = e2e_model()
    ids, mask, px, prior = _batch(5)
    spec = jp.reducers.compose(jp.reducers.uniform(72), oracle(8))
    out = m(ids, px, attention_mask=mask, reducer=spec, reducer_inputs={"patch_prior": prior})
    first = np.asarray(jp.reducers.uniform(72)(random_projector_context(1)).index[0])  # all valid: fixed picks
    kept, kv = np.asarray(out.kept), np.asarray(out.kept_valid)
    for i in range(3):
        sub_prior, sub_valid = prior[i, first], np.ones(72, bool)
        want, _ = numpy_oracle(sub_prior, sub_valid, 8)
        assert kept[i][kv[i]].tolist() == first[want].tolist()


def test_refusals_name_the_problem():
    m = e2e_model()
    ids, mask, px, prior = _batch(0)
    with pytest.raises(InputError, match="Oracle needs reducer_inputs.*patch_prior.*synthvqa"):
        m(ids, px, attention_mask=mask, reducer=oracle(8))
    with pytest.raises(InputError, match=r"shape \(2, 144\); expected \(3, 144\)"):
        m(ids, px, attention_mask=mask, reducer=oracle(8), reducer_inputs={"patch_prior": prior[:2]})
    bad = prior.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        m(ids, px, attention_mask=mask, reducer=oracle(8), reducer_inputs={"patch_prior": bad})
    next_cfg = dataclasses.replace(E2E_CFG, model_type="llava_next")
    with pytest.raises(InputError, match="only .*'llava'.* models .*'llava_next'"):
        check_reducer_inputs(next_cfg, (oracle(8),), {"patch_prior": prior}, 3)
    # inputs no reducer reads are ignored: the full model and other reducers run as before
    full = m(ids, px, attention_mask=mask, reducer_inputs={"patch_prior": prior}).logits
    np.testing.assert_array_equal(np.asarray(full), np.asarray(m(ids, px, attention_mask=mask).logits))
    r = jp.reducers.random_prune(8)
    np.testing.assert_array_equal(
        np.asarray(m(ids, px, attention_mask=mask, reducer=r, reducer_inputs={"patch_prior": prior}).logits),
        np.asarray(m(ids, px, attention_mask=mask, reducer=r).logits))


def test_registry_lists_the_oracle_for_synthvqa_only():
    assert "oracle" not in registry.names() and "oracle" not in registry.names("llava")
    assert "oracle" in registry.names("llava", benchmark="synthvqa")
    assert "oracle" not in registry.names("llava_next", benchmark="synthvqa")
    assert "oracle" not in registry.names(benchmark="pope")
    assert registry.benchmarks_of("oracle") == ("synthvqa",) and registry.benchmarks_of("random") is None
    assert registry.make("oracle", 16, E2E_CFG) == Oracle(16)


def test_patch_prior_from_the_scene_generator():
    item = make_item("test", 0, 3)
    rd = render(item.scene)
    for qa in item.qas:
        pr = patch_prior(qa, rd.colour_map, rd.shape_map).reshape(12, 12)
        np.testing.assert_array_equal(pr.reshape(-1), prior_for_question_id(question_id(item, qa)))
        words = qa.question.lower().rstrip("?").split()
        if qa.qtype == "colour":
            s = next(SHAPES.index(w) + 1 for w in words if w in SHAPES)
            np.testing.assert_array_equal(pr > 0, rd.shape_map == s)
            assert pr.sum() >= 2  # an object covers several patches
        elif qa.qtype == "count":
            c = next(COLOUR_NAMES.index(w) + 1 for w in words if w in COLOUR_NAMES)
            np.testing.assert_array_equal(pr > 0, rd.colour_map == c)
        elif qa.qtype == "exist" and qa.answer == "no":
            assert pr.sum() == 0
    with pytest.raises(ValueError, match="not a synthvqa question id"):
        prior_for_question_id("gqa_123")
