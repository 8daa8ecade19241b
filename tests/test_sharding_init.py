"""``sharding.per_shape_params``: benchmark init with one small program per distinct parameter shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxprune import sharding as S
from jaxprune.model import Llava
from tests.test_sharding import gqa_config


def flat(state) -> dict:
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def test_per_shape_matches_init_params_layout_and_kinds():
    cfg = gqa_config()
    want = flat(Llava.random(cfg, seed=0).params)
    got = flat(S.per_shape_params(cfg, seed=0))
    assert got.keys() == want.keys()
    for name, x in got.items():
        assert x.shape == want[name].shape and x.dtype == want[name].dtype, name
        kind = S.init_kind(name)
        if kind == "ones":
            assert (x == 1).all(), name
        elif kind == "zeros":
            assert (x == 0).all(), name
        else:
            assert x.size < 64 or 0.015 < x.std() < 0.025, (name, x.std())
    # the 3 decoder layers share programs but draw different values
    a, b = got["language.layers.0.mlp.up_proj.kernel"], got["language.layers.1.mlp.up_proj.kernel"]
    assert not np.array_equal(a, b)
    assert S.init_kind("language.norm.scale") == "ones" and S.init_kind("vision.pre_layrnorm.bias") == "zeros"
    # deterministic per seed, different across seeds
    again = flat(S.per_shape_params(cfg, seed=0))
    assert all(np.array_equal(again[k], got[k]) for k in got)
    assert not np.array_equal(flat(S.per_shape_params(cfg, seed=1))["lm_head.kernel"], got["lm_head.kernel"])


def test_per_shape_compiles_per_distinct_shape(monkeypatch):
    """Compile count depends on the distinct shapes, not on depth (the 7B GPU compile problem)."""
    calls = []
    real = jax.jit
    monkeypatch.setattr(S.jax, "jit", lambda f, **kw: calls.append(1) or real(f, **kw))
    import dataclasses
    cfg = gqa_config()
    S.per_shape_params(cfg)
    shallow = len(calls)
    calls.clear()
    deep = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=7))
    S.per_shape_params(deep)
    assert len(calls) == shallow
    assert shallow < len(flat(Llava.abstract(cfg)[1])) / 2


def test_random_model_per_shape_runs_and_refuses_unknown_init():
    from experiments.bench_forward import make_inputs

    cfg = gqa_config()
    ids, mask, px = make_inputs(cfg, 2)
    m = S.random_model(cfg, None, seed=0, init="per_shape")
    assert np.isfinite(np.asarray(m(ids, px, mask).logits)).all()
    with pytest.raises(S.ShardingError, match="init must be"):
        S.random_model(cfg, None, init="zeros")
