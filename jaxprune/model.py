"""The public model object: ``jp.load(path)`` -> :class:`Llava` with ``__call__`` and ``generate``.

The NNX module is split once into ``(graphdef, params)``; every entry point is a ``jax.jit`` of a
pure function of ``(params, arrays)`` with the graphdef closed over, so a call never re-traverses
the module graph and a shape bucket compiles once. Prompts are right-padded (mask 0) up to a
multiple of ``bucket`` tokens before tracing, which is exact under causal attention, so prompts of
nearby lengths share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import generate as gen
from jaxprune.config import LlavaConfig
from jaxprune.inputs import Batch, prepare_batch
from jaxprune.models import anyres as _anyres
from jaxprune.models.llava import LlavaModule
from jaxprune.models.param_spec import param_shapes


@dataclasses.dataclass(frozen=True)
class LlavaOutput:
    logits: jax.Array  # [B, T_out, V] fp32
    attention_mask: jax.Array | None = None  # [B, T_out] validity of the (reduced) sequence; None = as given
    kept: jax.Array | None = None            # [N_img, k] source patch index of each visual token (-1: empty/CLS)
    kept_valid: jax.Array | None = None      # [N_img, k] bool


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
        self._forward = jax.jit(functools.partial(_forward_fn, graphdef))
        self._prefill = jax.jit(functools.partial(_prefill_fn, graphdef), static_argnames=("max_new_tokens",))
        self._decode = jax.jit(functools.partial(_decode_fn, graphdef),
                               static_argnames=("max_new_tokens", "eos_ids", "pad_id"))

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
    def prepare(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None,
                position_ids=None) -> Batch:
        return prepare_batch(self.cfg, input_ids, pixel_values, attention_mask, image_sizes, position_ids,
                             bucket=self.bucket, dtype=self.dtype)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
                 position_ids=None) -> LlavaOutput:
        """Logits ``[B, T, V]`` for HF-style inputs (``reducer=None``: exactly HF's layout).

        ``position_ids`` default to ``cumsum(attention_mask) - 1`` (what HF ``generate`` uses); HF's
        plain forward uses ``arange(T)``, which differs only on left-padded rows.
        """
        if reducer is not None:
            from jaxprune.reducers.plan import run_forward  # reducers plug in here

            return run_forward(self, input_ids, pixel_values, attention_mask, image_sizes, reducer, position_ids)
        b = self.prepare(input_ids, pixel_values, attention_mask, image_sizes, position_ids)
        if b.anyres is not None:  # llava_next: static packing plan built on the host from image_sizes
            logits = self._forward(self.params, b.input_ids, b.pixel_values, b.valid, b.positions,
                                   anyres=b.anyres.device_arrays)
            return LlavaOutput(logits=logits[:, : b.length])
        logits = self._forward(self.params, b.input_ids, b.pixel_values, b.valid, b.positions)
        return LlavaOutput(logits=logits[:, : b.length])

    def generate(self, input_ids, pixel_values=None, attention_mask=None, image_sizes=None, reducer=None,
                 max_new_tokens: int = 32, eos_token_id: int | tuple[int, ...] | None = None,
                 pad_token_id: int | None = None) -> jax.Array:
        """Greedy decoding: ``[B, max_new_tokens]`` int32; rows that hit EOS are filled with the pad id."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        eos = self.cfg.text.eos_token_id if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (
            self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else (eos[0] if eos else 0))
        if reducer is not None:
            from jaxprune.reducers.plan import run_generate

            return run_generate(self, input_ids, pixel_values, attention_mask, image_sizes, reducer,
                                max_new_tokens, tuple(eos), int(pad))
        b = self.prepare(input_ids, pixel_values, attention_mask, image_sizes)
        if b.anyres is not None:  # llava_next
            state = self._prefill(self.params, b.input_ids, b.pixel_values, b.valid, b.positions,
                                  max_new_tokens=max_new_tokens, anyres=b.anyres.device_arrays)
            return self._decode(self.params, state, max_new_tokens=max_new_tokens, eos_ids=tuple(eos),
                                pad_id=int(pad))
        state = self._prefill(self.params, b.input_ids, b.pixel_values, b.valid, b.positions,
                              max_new_tokens=max_new_tokens)
        return self._decode(self.params, state, max_new_tokens=max_new_tokens, eos_ids=tuple(eos), pad_id=int(pad))


def _embed(m: LlavaModule, input_ids, pixel_values, anyres_arrays=None):
    """``anyres_arrays``: llava_next only, ``(gather_index [N, M], valid [N, M])`` from
    :func:`jaxprune.models.anyres.build_layout`; ``pixel_values`` are then ``[N, crops, C, S, S]``."""
    if pixel_values is None:
        return m.embed_text(input_ids)
    if anyres_arrays is not None:
        return _anyres.embed(m, input_ids, pixel_values, *anyres_arrays)
    return m.merge(input_ids, m.image_features(pixel_values))


def _forward_fn(graphdef, params, input_ids, pixel_values, valid, positions, anyres=None):
    m = nnx.merge(graphdef, params)
    return gen.full_logits(m, _embed(m, input_ids, pixel_values, anyres), positions, valid)


def _prefill_fn(graphdef, params, input_ids, pixel_values, valid, positions, *, max_new_tokens, anyres=None):
    """Jitted prefill: first-token logits plus the decode state (caches sized ``T + max_new_tokens``)."""
    m = nnx.merge(graphdef, params)
    return gen.prefill(m, _embed(m, input_ids, pixel_values, anyres), positions, valid, max_new_tokens)


def _decode_fn(graphdef, params, state, *, max_new_tokens, eos_ids, pad_id):
    m = nnx.merge(graphdef, params)
    return gen.greedy_decode(m, state, max_new_tokens, eos_ids, pad_id)
