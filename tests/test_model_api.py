"""Model API without torch: compile counts, bad inputs, config refusal."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from tests.conftest import make_batch

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=28, patch_size=7),
    text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    image_token_index=100)


@pytest.fixture(scope="module")
def model():
    return jp.Llava.random(CFG, seed=0)


def test_one_compile_per_shape_bucket(model):
    """20 different inputs whose lengths fall in one 32-token bucket trace the forward once."""
    m = jp.Llava(model.cfg, model.graphdef, model.params)  # fresh jit caches
    traces = {"n": 0}
    fwd = m.programs.forward

    def counting(*a):
        traces["n"] += 1
        return fwd(*a)

    for i in range(20):
        n_text = [1 + (i % 9), 1 + (i * 7) % 11]
        ids, mask, px = make_batch(n_text, CFG.tokens_per_image, 100, 128, 28, seed=i)
        assert 16 < ids.shape[1] <= 32
        out = m(ids, px, attention_mask=mask)
        assert out.logits.shape == (2, ids.shape[1], 128)
    assert m.programs.forward._cache_size() == 1
    for i in range(20):
        ids, mask, px = make_batch([2 + i % 5, 3], CFG.tokens_per_image, 100, 128, 28, seed=100 + i)
        m.generate(ids, px, attention_mask=mask, max_new_tokens=4)
    assert m.programs.prefill._cache_size() == 1 and m.programs.decode._cache_size() == 1


def test_trace_count_with_chex(model):
    from jaxprune.engine.run import forward_fn

    chex.clear_trace_counter()

    def fwd(params, arrays, static):
        return forward_fn(model.graphdef, params, arrays, static=static)

    f = jax.jit(chex.assert_max_traces(fwd, n=1), static_argnames="static")
    for i in range(20):
        ids, mask, px = make_batch([3 + i % 4], CFG.tokens_per_image, 100, 128, 28, seed=i)
        p = model.plan(ids, px, mask)
        f(model.params, p.arrays, p.static)


def test_text_only_input(model):
    ids = np.array([[1, 5, 6, 7]])
    assert model(ids).logits.shape == (1, 4, 128)


@pytest.mark.parametrize("case,match", [
    ("pixel_rank", r"pixel_values must be \[N, C, H, W\]"),
    ("channels", r"has 1 channels, the vision tower expects 3"),
    ("nhwc", r"has 28 channels"),
    ("size", r"images are 32x32, the vision tower expects 28x28"),
    ("nan", r"NaN or inf \(image 1\)"),
    ("count", r"image tokens .* but 1 image\(s\) give 16 visual tokens"),
    ("no_pixels", r"no pixel_values"),
    ("mask_shape", r"attention_mask shape"),
    ("empty_row", r"no valid token"),
    ("oov", r"outside the vocabulary"),
    ("ids_rank", r"input_ids must be \[B, T\]"),
])
def test_bad_inputs_are_named(model, case, match):
    ids, mask, px = make_batch([3, 5], CFG.tokens_per_image, 100, 128, 28)
    if case == "pixel_rank":
        px = px[0]
    elif case == "channels":
        px = px[:, :1]
    elif case == "nhwc":
        px = px.transpose(0, 2, 3, 1)
    elif case == "size":
        px = np.zeros((2, 3, 32, 32), np.float32)
    elif case == "nan":
        px = px.copy()
        px[1, 0, 3, 3] = np.nan
    elif case == "count":
        px = px[:1]
    elif case == "no_pixels":
        px = None
    elif case == "mask_shape":
        mask = mask[:, 1:]
    elif case == "empty_row":
        mask = mask.copy()
        mask[1] = 0
    elif case == "oov":
        ids = ids.copy()
        ids[0, -1] = 5000
    elif case == "ids_rank":
        ids = ids[0]
    with pytest.raises(jp.InputError, match=match):
        model(ids, px, attention_mask=mask)


@pytest.mark.parametrize("field,value,match", [
    ("text_config.rope_scaling", {"type": "linear", "factor": 2.0}, r"text_config.rope_scaling"),
    ("text_config.attention_bias", True, r"text_config.attention_bias"),
    ("text_config.mlp_bias", True, r"text_config.mlp_bias"),
    ("text_config.hidden_act", "gelu", r"text_config.hidden_act"),
    ("vision_config.hidden_act", "swish", r"vision_config.hidden_act"),
    ("vision_feature_layer", [-2, -5], r"vision_feature_layer.*list"),
    ("text_config.my_new_field", 3, r"unknown config field.*text_config.my_new_field"),
    ("frobnicate", 1, r"unknown config field.*frobnicate"),
    ("text_config.rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     r"rope_parameters"),
    ("vision_feature_select_strategy", "cls", r"vision_feature_select_strategy"),
])
def test_config_refuses_unimplemented_fields(field, value, match, tmp_path):
    d = CFG.to_hf_dict()
    parts = field.split(".")
    tgt = d
    for p in parts[:-1]:
        tgt = tgt[p]
    tgt[parts[-1]] = value
    with pytest.raises(ConfigError, match=match):
        LlavaConfig.from_hf_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        jp.load_config(tmp_path)


def test_config_round_trip_and_hf_metadata_ignored():
    d = CFG.to_hf_dict()
    d["text_config"].update(torch_dtype="float16", _name_or_path="lmsys/vicuna-7b-v1.5", architectures=["X"])
    d["transformers_version"] = "4.36.0"
    assert LlavaConfig.from_hf_dict(d) == CFG
    assert LlavaConfig.from_hf_dict(CFG.to_hf_dict()) == CFG
