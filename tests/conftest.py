"""Shared fixtures: tiny random HF LLaVA models built locally with transformers (nothing downloaded)."""

from __future__ import annotations

import os

# Tests check numerics and shapes, not speed: skipping most XLA optimisation passes halves compile time
# (the suite is compile-bound). Set through the environment so subprocess tests inherit it.
# Benchmarks (experiments/) never set it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np
import pytest

# Tiny LLaVA-1.5 configs: MHA and GQA, odd sizes, feature layer -1/-2, both select strategies.
TINY_CONFIGS = {
    "mha": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=28, patch_size=7),
                text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128),
                vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=100),
    "gqa_full": dict(vision=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                                 image_size=28, patch_size=7),
                     text=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                               num_key_value_heads=2, vocab_size=131, rms_norm_eps=1e-5),
                     vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=130),
    "odd": dict(vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                            image_size=30, patch_size=6, hidden_act="quick_gelu"),
                text=dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=1, vocab_size=97, rope_theta=500.0),
                vision_feature_layer=-2, vision_feature_select_strategy="full", image_token_index=96,
                tie_word_embeddings=True),
}


def build_hf_llava(name: str, seed: int = 0):
    """A random ``LlavaForConditionalGeneration`` for ``TINY_CONFIGS[name]`` (eval mode, fp32)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = TINY_CONFIGS[name]
    text = dict(spec["text"])
    tie = spec.get("tie_word_embeddings", False)
    theta = text.pop("rope_theta", 10000.0)
    tc = LlamaConfig(**text, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": theta})
    vc = CLIPVisionConfig(**spec["vision"])
    hc = LlavaConfig(text_config=tc, vision_config=vc, image_token_index=spec["image_token_index"],
                     vision_feature_layer=spec["vision_feature_layer"],
                     vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                     tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return perturb_(LlavaForConditionalGeneration(hc).eval())


def perturb_(model):
    """Default init leaves norms at 1/0 and tiny logits: perturb every weight for a meaningful test."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "layrnorm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim >= 1:
                p.copy_(torch.randn_like(p) * 0.08)
    return model


@pytest.fixture(scope="session")
def hf_llava_dir(tmp_path_factory):
    """``name -> (hf_model, directory saved with save_pretrained)``, built once per session."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = build_hf_llava(name)
            d = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(d)
            cache[name] = (model, d)
        return cache[name]

    return get


def make_batch(n_text: list[int], tokens_per_image: int, image_token: int, vocab: int, image_size: int,
               padding: str = "left", seed: int = 0, prefix: int = 2):
    """A padded batch: each row = ``prefix`` text ids, one image's tokens, ``n_text[i]`` text ids."""
    rng = np.random.default_rng(seed)
    lo, hi = 3, min(vocab, image_token) - 1
    rows = [np.concatenate([rng.integers(lo, hi, prefix), np.full(tokens_per_image, image_token),
                            rng.integers(lo, hi, n)]) for n in n_text]
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        if padding == "left":
            ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
        else:
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
    px = rng.standard_normal((len(rows), 3, image_size, image_size)).astype(np.float32)
    return ids, mask, px
