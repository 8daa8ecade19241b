"""The public model object: ``jp.load(path)`` -> :class:`Llava` with ``__call__`` and ``generate``.

The NNX module is split once into ``(graphdef, params)``; every entry point goes through the engine
(:mod:`jaxprune.engine`): a host-side :func:`~jaxprune.engine.plan` (validation, static layout, bucketing), then
the jitted programs of :class:`~jaxprune.engine.Programs` -- pure functions of ``(params, arrays)`` with the
graphdef closed over, so a call never re-traverses the module graph and a shape bucket compiles once. Prompts
are right-padded (mask 0) up to a multiple of ``bucket`` tokens, exact under causal attention.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import engine
from jaxprune.config import LlavaConfig
from jaxprune.engine import LlavaOutput, Plan
from jaxprune.models.llava import LlavaModule
from jaxprune.models.param_spec import param_shapes


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def tree_path_name(path) -> str:
    """Canonical dotted parameter name (``param_spec`` style) of a ``jax.tree_util`` key path into an
    ``nnx.State`` or a nested dict; the ``Variable`` wrapper's ``value`` / ``raw_value`` step carries no name."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("value", "raw_value"):
            continue
        else:
            keys.append(str(getattr(k, "name", getattr(k, "key", k))))
    return ".".join(keys)


class Llava:
    """A LLaVA model with jitted forward and greedy generation. Build with :func:`jaxprune.load`."""

    def __init__(self, cfg: LlavaConfig, graphdef: Any, params: nnx.State, dtype=jnp.float32, bucket: int = 32):
        self.cfg = cfg
        self.graphdef = graphdef
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.bucket = int(bucket)
        self.programs = engine.Programs(graphdef)

    # ---- construction ----------------------------------------------------------------------------
    @staticmethod
    def abstract(cfg: LlavaConfig, dtype=jnp.float32):
        return nnx.split(nnx.eval_shape(lambda: LlavaModule(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))

    @classmethod
    def random(cls, cfg: LlavaConfig, seed: int = 0, dtype=jnp.float32, **kw) -> "Llava":
        """Random-initialised model (tests, benchmarks, demos: speed does not depend on weights)."""
        graphdef, params = nnx.split(LlavaModule(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
        return cls(cfg, graphdef, params, dtype, **kw)

    @classmethod
    def from_params(cls, cfg: LlavaConfig, flat: Mapping[str, Any], dtype=jnp.float32, **kw) -> "Llava":
        """Build from canonical flat parameters (``param_spec`` names, JAX layouts)."""
        expected = param_shapes(cfg)
        missing = sorted(set(expected) - set(flat))
        unexpected = sorted(set(flat) - set(expected))
        bad = sorted(k for k in set(expected) & set(flat) if tuple(np.shape(flat[k])) != expected[k])
        if missing or unexpected or bad:
            parts = []
            if missing:
                parts.append(f"missing keys: {missing}")
            if unexpected:
                parts.append(f"unexpected keys: {unexpected}")
            if bad:
                parts.append("mis-shaped keys: " + ", ".join(
                    f"{k} {tuple(np.shape(flat[k]))} (expected {expected[k]})" for k in bad))
            raise ValueError("parameters do not match the config; " + "; ".join(parts))
        graphdef, state = cls.abstract(cfg, dtype)
        for path, var in nnx.to_flat_state(state):
            var.set_value(jnp.asarray(flat[_path_name(path)], dtype=dtype))
        return cls(cfg, graphdef, state, dtype, **kw)

    def flat_params(self) -> dict[str, np.ndarray]:
        """Canonical flat parameters as NumPy arrays (inverse of :meth:`from_params`)."""
        return {_path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(self.params)}

    @property
    def module(self) -> LlavaModule:
        return nnx.merge(self.graphdef, self.params)

    # ---- entry points ----------------------------------------------------------------------------
    def put_arrays(self, arrays: dict) -> dict:
        """Place a plan's host arrays on the device(s) (the sharded model overrides this)."""
        return jax.tree_util.tree_map(jnp.asarray, arrays)

    def plan(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
             position_ids=None, pixel_values_videos=None, reducer_inputs=None) -> Plan:
        """Validate a call and fix its static layout (:func:`jaxprune.engine.plan`)."""
        return engine.plan(self, input_ids, pixel_values, attention_mask, image_sizes, reducer, position_ids,
                           pixel_values_videos, reducer_inputs)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
                 position_ids=None, pixel_values_videos=None, reducer_inputs=None) -> LlavaOutput:
        """Logits ``[B, T, V]`` for HF-style inputs (``reducer=None``: exactly HF's layout).

        ``position_ids`` default to ``cumsum(attention_mask) - 1`` (what HF ``generate`` uses); HF's
        plain forward uses ``arange(T)``, which differs only on left-padded rows. With a reducer, the
        logits cover the reduced sequence (``out.attention_mask`` its validity, ``out.kept`` the source of
        each visual token). ``pixel_values_videos [B_v, frames, C, H, W]``: videos (Video-LLaVA).
        ``reducer_inputs``: ``{name: [images, patches]}`` for reducers that read caller-side information (the
        synthvqa ``oracle``: ``patch_prior``); see :mod:`jaxprune.engine.reducer_inputs`."""
        return engine.forward(self, self.plan(input_ids, pixel_values, attention_mask, image_sizes, reducer,
                                              position_ids, pixel_values_videos, reducer_inputs))

    def generate(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
                 max_new_tokens: int = 32, eos_token_id: int | tuple[int, ...] | None = None,
                 pad_token_id: int | None = None, pixel_values_videos=None, reducer_inputs=None) -> jax.Array:
        """Greedy decoding: ``[B, max_new_tokens]`` int32; rows that hit EOS are filled with the pad id."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        eos, pad = self.stop_ids(eos_token_id, pad_token_id)
        p = self.plan(input_ids, pixel_values, attention_mask, image_sizes, reducer,
                      pixel_values_videos=pixel_values_videos, reducer_inputs=reducer_inputs)
        state = engine.prefill(self, p, max_new_tokens)
        return engine.decode(self, state, max_new_tokens, eos, pad)

    def stop_ids(self, eos_token_id=None, pad_token_id=None) -> tuple[tuple[int, ...], int]:
        """``(eos ids, pad id)`` for generation: the given ones, else the config's (pad falls back to EOS, then 0)."""
        eos = self.cfg.text.eos_token_id if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        pad = pad_token_id if pad_token_id is not None else (
            self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else (eos[0] if eos else 0))
        return tuple(int(e) for e in eos), int(pad)
