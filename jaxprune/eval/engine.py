"""Compiled prefill + greedy decode of one (model, reducer) over the ``data`` mesh, with timing hooks.

The model's own jitted functions are compiled ahead of time (``.lower(...).compile()``) once per shape
(batch rows, text-length bucket, with/without image): the executable is what runs every batch, so the compile
time per shape and XLA's ``cost_analysis`` / ``memory_analysis`` come from the very program that is timed.
Inputs are batch-sharded global arrays, parameters replicated; nothing else differs from ``Llava.generate``
(same validation and bucketing via ``Llava.prepare`` / the reducer plan, same prefill and decode functions).

This module is the only place that touches the model's private entry points (``Llava._prefill`` /
``_decode`` and ``jaxprune.reducers.plan``'s jitted prefill); a change of that API lands here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed as dist
from .batching import Rows


@dataclasses.dataclass
class Compiled:
    prefill: Any
    decode: Any                          # compiled on first use (needs the prefill's output layout)
    compile_s: dict[str, float]          # "prefill" / "decode" -> seconds (lower + compile)
    xla_flops: float | None              # cost_analysis()["flops"] of the prefill executable (per device)
    xla_temp_bytes: int | None           # memory_analysis().temp_size_in_bytes of the prefill
    shape: tuple[int, int, bool]         # (rows, bucketed length, with image)


@dataclasses.dataclass
class Prepared:
    args: tuple                          # global arrays for the prefill executable (after params)
    shape: tuple[int, int, bool]


def _cost_flops(compiled: Any) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - "an aid for manual inspection": may be missing on a backend
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not isinstance(ca, dict):
        return None
    f = ca.get("flops")
    return float(f) if f is not None and f >= 0 else None


def _temp_bytes(compiled: Any) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes) if m is not None else None
    except Exception:  # noqa: BLE001
        return None


class Engine:
    """Runs batches of :class:`~jaxprune.eval.batching.Rows` for one reducer spec (None = full model)."""

    def __init__(self, model: Any, reducer: Any, mesh: Any, params: Any, max_new_tokens: int,
                 eos_ids: tuple[int, ...], pad_id: int, cache: dict) -> None:
        self.model = model
        self.reducer = reducer
        self.mesh = mesh
        self.params = params          # replicated on ``mesh``
        self.max_new_tokens = int(max_new_tokens)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.cache = cache            # shared across engines of one model + mesh
        self.compiled_shapes: list[Compiled] = []

    # ---- inputs --------------------------------------------------------------------------------------------
    def prepare(self, rows: Rows, global_rows: int) -> Prepared:
        """Validate + bucket this process' rows (as ``Llava.generate`` would) and assemble global arrays."""
        m = self.model
        if self.reducer is not None and rows.pixel_values is not None:
            from jaxprune.reducers.plan import _prepare

            b = _prepare(m, rows.input_ids, rows.pixel_values, rows.attention_mask, None, self.reducer)[0]
        else:
            b = m.prepare(rows.input_ids, rows.pixel_values, rows.attention_mask)
        to = lambda x: dist.to_global(np.asarray(x), self.mesh, global_rows)
        ids, valid = to(b.input_ids), to(b.valid)
        px = None if b.pixel_values is None else to(b.pixel_values)
        with_img = px is not None
        if self.reducer is not None and with_img:
            args = (ids, px, valid)
        else:
            args = (ids, px, valid, to(b.positions))
        return Prepared(args, (global_rows, int(b.input_ids.shape[1]), with_img))

    # ---- compiled programs ---------------------------------------------------------------------------------
    def _key(self, shape) -> tuple:
        devs = tuple(d.id for d in self.mesh.devices.flat)
        red = self.reducer if shape[2] else None
        return (red, shape, self.max_new_tokens, self.eos_ids, self.pad_id, devs)

    def compiled(self, prep: Prepared) -> Compiled:
        key = self._key(prep.shape)
        hit = self.cache.get(key)
        if hit is None:
            hit = self._compile(prep)
            self.cache[key] = hit
        if all(c is not hit for c in self.compiled_shapes):
            self.compiled_shapes.append(hit)
        return hit

    def _compile(self, prep: Prepared) -> Compiled:
        m, n = self.model, self.max_new_tokens
        t0 = time.perf_counter()
        if self.reducer is not None and prep.shape[2]:
            from jaxprune.reducers.plan import _jitted, _prefill_reduced, as_tuple

            fn = _jitted(m, "prefill", _prefill_reduced, ("reducers", "imgs_per_row", "max_new_tokens"))
            lowered = fn.lower(self.params, *prep.args, reducers=as_tuple(self.reducer), imgs_per_row=1,
                               max_new_tokens=n)
        else:
            lowered = m._prefill.lower(self.params, *prep.args, max_new_tokens=n)
        prefill = lowered.compile()
        return Compiled(prefill, None, {"prefill": time.perf_counter() - t0}, _cost_flops(prefill),
                        _temp_bytes(prefill), prep.shape)

    def _decoder(self, c: Compiled, state: Any) -> Any:
        """The decode executable for the state layout of ``c``'s prefill (compiled on first use)."""
        if c.decode is None:
            t0 = time.perf_counter()
            c.decode = self.model._decode.lower(self.params, state, max_new_tokens=self.max_new_tokens,
                                                eos_ids=self.eos_ids, pad_id=self.pad_id).compile()
            c.compile_s["decode"] = time.perf_counter() - t0
        return c.decode

    # ---- running -------------------------------------------------------------------------------------------
    def generate(self, prep: Prepared) -> np.ndarray:
        """Greedy token ids ``[rows, max_new_tokens]`` (all rows, on every process)."""
        c = self.compiled(prep)
        state = c.prefill(self.params, *prep.args)
        return dist.gather(self._decoder(c, state)(self.params, state))

    def time_batch(self, prep: Prepared, reps: int = 3) -> dict[str, Any]:
        """TTFT (prefill incl. vision tower + first-token argmax; median of ``reps`` after warm-up) and decode
        ms/token on one batch. Every process must call it (the programs are global)."""
        c = self.compiled(prep)
        state = c.prefill(self.params, *prep.args)  # warm-up, including the argmax below
        jax.block_until_ready(jnp.argmax(state.first_logits, axis=-1))
        ttft = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            state = c.prefill(self.params, *prep.args)
            jax.block_until_ready(jnp.argmax(state.first_logits, axis=-1))
            ttft.append(time.perf_counter() - t0)
        jax.block_until_ready(state)
        decode = self._decoder(c, state)
        t0 = time.perf_counter()
        toks = decode(self.params, state)
        jax.block_until_ready(toks)
        dt = time.perf_counter() - t0
        toks = dist.gather(toks)
        steps = max(1, _loop_steps(toks, self.eos_ids, self.max_new_tokens))
        return {"ttft_ms": 1e3 * float(np.median(ttft)), "ttft_ms_min": 1e3 * min(ttft),
                "ttft_ms_all": [1e3 * t for t in ttft],
                "decode_ms_per_token": 1e3 * dt / steps, "decode_steps": steps, "batch_rows": prep.shape[0],
                "seq_bucket": prep.shape[1]}


def _loop_steps(tokens: np.ndarray, eos_ids: tuple[int, ...], max_new: int) -> int:
    """Decode-loop iterations: the longest row's length (through its EOS) minus the prefill's first token."""
    if not eos_ids:
        return max_new - 1
    hit = np.isin(tokens, np.asarray(eos_ids))
    lengths = np.where(hit.any(1), hit.argmax(1) + 1, max_new)
    return int(lengths.max()) - 1
