"""Compile the next run's programs on a background thread while the current run answers (one process only).

A sweep runs reducer specs one after another; each new spec needs new XLA programs (prefill + decode), compiled
on one core while the other idles. :class:`CompileAhead` overlaps that: when run ``i`` has built its first batch
of rows (host side, main thread: the tokenizer is not shared), it prepares the same rows for spec ``i + 1``
(``Engine.prepare``: validation and static layout, main thread) and hands :meth:`Engine.warm` to a worker thread.
The engine's per-program locks make the main thread wait for a program in flight instead of compiling it twice.
Before run ``i`` times its TTFT it calls :meth:`CompileAhead.quiet`, which waits for the worker, so timings are
never taken beside a compile. Any error while compiling ahead is dropped: the run itself meets it again and
reports it as usual. Several processes (multi-host): off (the programs are global, every process must compile in
the same order).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from . import distributed as dist
from .config import ReducerSpec


class CompileAhead:
    """Warm-up of spec ``i + 1``'s programs during run ``i`` (module docstring)."""

    def __init__(self, ctx: Any, specs: Sequence[ReducerSpec], benchmark: str) -> None:
        self.ctx = ctx
        self.specs = list(specs)
        self.benchmark = benchmark
        self.enabled = dist.process_count() == 1 and len(self.specs) > 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxprune-compile-ahead") if self.enabled else None
        self._pending: Future | None = None
        self.submitted: list[str] = []   # labels warmed ahead (tests, logs)

    def first_rows(self, spec: ReducerSpec, rows: Any, global_rows: int, max_new: int) -> None:
        """Called by the run of ``spec`` once its first batch of rows exists: warm the next spec on them."""
        if not self.enabled:
            return
        nxt = self._next(spec)
        if nxt is None:
            return
        try:
            from .engine import Engine
            from .runner import check_reducer_benchmark, make_reducer

            check_reducer_benchmark(nxt, self.benchmark)
            c = self.ctx
            eng = Engine(c.model, make_reducer(nxt, c.model.cfg), c.mesh, c.params, max_new, c.eos_ids, c.pad_id,
                         c.cache)
            prep = eng.prepare(rows, global_rows)
        except Exception:  # noqa: BLE001 - the run of that spec reports its own errors
            return
        self.quiet()
        self._pending = self._pool.submit(_warm, eng, prep)
        self.submitted.append(nxt.label)

    def quiet(self) -> None:
        """Wait until nothing compiles in the background (before any timing)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.quiet()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _next(self, spec: ReducerSpec) -> ReducerSpec | None:
        for i, s in enumerate(self.specs[:-1]):
            if s is spec:
                return self.specs[i + 1]
        return None


def _warm(engine: Any, prep: Any) -> None:
    try:
        engine.warm(prep)
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
