"""Compiled prefill + greedy decode of one (model, reducer) over the ``data`` mesh, with timing hooks.

The model's own jitted functions are compiled ahead of time (``.lower(...).compile()``) once per shape
(batch rows, text-length bucket, with/without image): the executable is what runs every batch, so the compile
time per shape and XLA's ``cost_analysis`` / ``memory_analysis`` come from the very program that is timed.
Inputs are batch-sharded global arrays, parameters replicated; nothing else differs from ``Llava.generate``
(same validation and bucketing via ``Llava.prepare`` / the reducer plan, same prefill and decode functions).

Everything goes through the public engine (:mod:`jaxprune.engine`): ``model.plan`` for validation and the
static layout (any family: LLaVA-1.5, LLaVA-NeXT with ``image_sizes``), ``model.programs.prefill`` /
``.decode`` lowered ahead of time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed as dist
from .batching import Rows


#: the shared cache's entry holding the per-program locks (:meth:`Engine.compiled`)
LOCKS = "__locks__"


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
    args: tuple                          # (global arrays,) for the prefill executable (after params)
    shape: tuple[int, int, bool]
    static: Any = None                   # the plan's static part (the compiled program's key)


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
        videos = getattr(rows, "pixel_values_videos", None)  # [b, F, 3, S, S]: Video-LLaVA video rows
        reducer = self.reducer if rows.pixel_values is not None or videos is not None else None
        p = m.plan(rows.input_ids, rows.pixel_values, rows.attention_mask, getattr(rows, "image_sizes", None),
                   reducer, pixel_values_videos=videos, reducer_inputs=getattr(rows, "reducer_inputs", None))
        to = lambda x: dist.to_global(np.asarray(x), self.mesh, global_rows)
        rows_arrays = {k: to(v) for k, v in p.arrays.items() if k in ("input_ids", "valid", "positions")}
        per_image = {k: v for k, v in p.arrays.items() if k not in rows_arrays}
        n_local = int(np.asarray(rows.input_ids).shape[0])

        def place(x):  # pixels and per-image tables split like the rows (one image / video per row); a table
            x = np.asarray(x)  # over the whole batch (Video-LLaVA's unreduced placeholder order) is replicated
            if x.ndim and x.shape[0] == n_local:
                return to(x)
            if dist.process_count() > 1:
                raise ValueError("this model's unreduced batch layout spans the whole batch: run it in one process "
                                 "(or with a reducer)")
            return dist.replicate(x, self.mesh)

        if per_image:
            per_image = jax.tree_util.tree_map(place, per_image)
        arrays = {**rows_arrays, **per_image}
        with_img = "pixel_values" in arrays
        return Prepared((arrays,), (global_rows, int(p.arrays["input_ids"].shape[1]), with_img), p.static)

    # ---- compiled programs ---------------------------------------------------------------------------------
    def _key(self, prep: Prepared) -> tuple:
        devs = tuple(d.id for d in self.mesh.devices.flat)
        return (prep.static, prep.shape, self.max_new_tokens, self.eos_ids, self.pad_id, devs)

    def _lock(self, key: tuple) -> threading.Lock:
        """One lock per program key in the shared cache (``dict.setdefault`` is atomic): a program being compiled
        ahead on another thread (:mod:`jaxprune.eval.prefetch`) is waited for, never compiled twice."""
        return self.cache.setdefault(LOCKS, {}).setdefault(key, threading.Lock())

    def compiled(self, prep: Prepared) -> Compiled:
        key = self._key(prep)
        with self._lock(key):
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
        lowered = m.programs.prefill.lower(self.params, *prep.args, static=prep.static, max_new_tokens=n)
        prefill = lowered.compile()
        return Compiled(prefill, None, {"prefill": time.perf_counter() - t0}, _cost_flops(prefill),
                        _temp_bytes(prefill), prep.shape)

    def _decoder(self, c: Compiled, state: Any) -> Any:
        """The decode executable for the state layout of ``c``'s prefill (compiled on first use)."""
        if c.decode is None:
            with self.cache.setdefault(LOCKS, {}).setdefault(("decode", id(c)), threading.Lock()):
                if c.decode is None:
                    t0 = time.perf_counter()
                    dec = self.model.programs.decode.lower(self.params, state, max_new_tokens=self.max_new_tokens,
                                                           eos_ids=self.eos_ids, pad_id=self.pad_id).compile()
                    c.compile_s["decode"] = time.perf_counter() - t0
                    c.decode = dec
        return c.decode

    def warm(self, prep: Prepared) -> None:
        """Compile ``prep``'s prefill and decode programs (one prefill runs, for the decode's input layout)."""
        c = self.compiled(prep)
        state = c.prefill(self.params, *prep.args)
        self._decoder(c, state)
        jax.block_until_ready(state)  # nothing of it may still run when the caller times something

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
