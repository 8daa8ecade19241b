"""jaxprune: LLaVA-1.5 / LLaVA-NeXT in JAX/Flax NNX with static-shape visual-token reduction.

    import jaxprune as jp
    model = jp.load("path/to/llava-hf-or-converted-dir", dtype=jnp.float32)
    out = model(input_ids, pixel_values, attention_mask=mask)           # out.logits [B, T, V]
    tokens = model.generate(input_ids, pixel_values, max_new_tokens=32) # [B, 32]

Errors. Every error jaxprune raises on purpose is importable from here and derives from
:class:`JaxpruneError` as well as from the built-in base it always had (``except ValueError`` still works):
``ConfigError``, ``InputError``, ``ShardingError``, ``LoraError`` (``ValueError``), the checkpoint errors
``CheckpointError`` (alias ``ConvertError``) > ``CheckpointFileError`` / ``ParamMismatchError`` /
``DestinationExistsError``, ``BudgetError`` (``ValueError``), and the eval harness' ``EvalError`` >
``ItemError`` / ``EvalConfigError`` (``jaxprune.eval.ConfigError``) plus the benchmark-file errors
``BenchmarkFormatError`` / ``UnknownBenchmarkError`` / ``MissingAnswersError`` (``ValueError``). The
reducer, sharding, LoRA and eval ones are loaded on first use, so ``import jaxprune`` stays light.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import jax.numpy as jnp

from jaxprune.checkpoints import load_params
from jaxprune.checkpoints.errors import (
    CheckpointError,
    CheckpointFileError,
    ConvertError,
    DestinationExistsError,
    ParamMismatchError,
)
from jaxprune.config import ConfigError, LlavaConfig, TextConfig, VisionConfig, load_config
from jaxprune.errors import JaxpruneError
from jaxprune.inputs import InputError
from jaxprune.model import Llava, LlavaOutput

__version__ = "0.1.0"


def load(path: str | Path, dtype=jnp.float32, *, clip_dir: str | Path | None = None, bucket: int = 32) -> Llava:
    """Load a model from an HF LLaVA directory (config.json + safetensors, any key layout), an original
    LLaVA checkpoint (``clip_dir`` = its CLIP tower), a hub id, or a directory written by
    :func:`jaxprune.checkpoints.convert`. Parameters are cast to ``dtype``."""
    cfg, flat = load_params(path, dtype=None, clip_dir=clip_dir)
    return Llava.from_params(cfg, flat, dtype=dtype, bucket=bucket)


#: Names loaded on first use (``jp.reducers`` without importing every reducer at startup): name -> (module, attr).
_LAZY = {
    "reducers": ("jaxprune.reducers", None),
    "BudgetError": ("jaxprune.reducers.base", "BudgetError"),
    "ShardingError": ("jaxprune.sharding", "ShardingError"),
    "LoraError": ("jaxprune.lora", "LoraError"),
    "EvalError": ("jaxprune.eval.config", "EvalError"),
    "ItemError": ("jaxprune.eval.config", "ItemError"),
    "EvalConfigError": ("jaxprune.eval.config", "ConfigError"),
    "BenchmarkFormatError": ("jaxprune.eval.benchmarks.base", "BenchmarkFormatError"),
    "UnknownBenchmarkError": ("jaxprune.eval.benchmarks.base", "UnknownBenchmarkError"),
    "MissingAnswersError": ("jaxprune.eval.benchmarks.base", "MissingAnswersError"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


#: Every error class jaxprune raises on purpose (the lazy ones resolve on first access).
ERRORS = ("JaxpruneError", "ConfigError", "InputError", "CheckpointError", "ConvertError", "CheckpointFileError",
          "ParamMismatchError", "DestinationExistsError", "BudgetError", "ShardingError", "LoraError", "EvalError",
          "ItemError", "EvalConfigError", "BenchmarkFormatError", "UnknownBenchmarkError", "MissingAnswersError")

__all__ = [
    "load", "Llava", "LlavaOutput", "LlavaConfig", "TextConfig", "VisionConfig", "load_config",
    "JaxpruneError", "ConfigError", "InputError", "CheckpointError", "ConvertError", "CheckpointFileError",
    "ParamMismatchError", "DestinationExistsError", "BudgetError", "ShardingError", "LoraError", "EvalError",
    "ItemError", "EvalConfigError", "BenchmarkFormatError", "UnknownBenchmarkError", "MissingAnswersError",
]
