"""jaxprune: LLaVA-1.5 / LLaVA-NeXT in JAX/Flax NNX with static-shape visual-token reduction.

    import jaxprune as jp
    model = jp.load("path/to/llava-hf-or-converted-dir", dtype=jnp.float32)
    out = model(input_ids, pixel_values, attention_mask=mask)           # out.logits [B, T, V]
    tokens = model.generate(input_ids, pixel_values, max_new_tokens=32) # [B, 32]
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from jaxprune.config import ConfigError, LlavaConfig, TextConfig, VisionConfig, load_config
from jaxprune.inputs import InputError
from jaxprune.model import Llava, LlavaOutput

__version__ = "0.1.0"


def load(path: str | Path, dtype=jnp.float32, *, clip_dir: str | Path | None = None, bucket: int = 32) -> Llava:
    """Load a model from an HF LLaVA directory (config.json + safetensors, any key layout), an original
    LLaVA checkpoint (``clip_dir`` = its CLIP tower), a hub id, or a directory written by
    ``python -m checkpoints_convert``. Parameters are cast to ``dtype``."""
    from checkpoints_convert import load_params

    cfg, flat = load_params(path, dtype=None, clip_dir=clip_dir)
    return Llava.from_params(cfg, flat, dtype=dtype, bucket=bucket)


def __getattr__(name):  # lazy: `jp.reducers` without importing every reducer at startup
    if name == "reducers":
        import importlib

        return importlib.import_module("jaxprune.reducers")
    raise AttributeError(name)


__all__ = ["load", "Llava", "LlavaOutput", "LlavaConfig", "TextConfig", "VisionConfig", "ConfigError",
           "InputError", "load_config"]
