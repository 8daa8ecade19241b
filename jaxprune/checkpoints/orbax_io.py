"""Save and restore a flat ``{dotted.name: array}`` parameter dict as an orbax checkpoint.

The tree orbax stores is the nested dict obtained by splitting the canonical names on ``.``
(``{"language": {"layers": {"0": {...}}}}``, all keys strings), i.e. the layout
``ocp.StandardCheckpointer().restore(path)`` returns. Leaves are NumPy arrays, so saving needs no
device copy, and the checkpoint restores as NumPy arrays.

Memory. orbax's default ``NumpyHandler`` deep-copies every host array before an (async) save and
then writes all leaves concurrently, so saving a dict of arrays peaks near 2-3x its size. We save
through a ``PyTreeCheckpointHandler`` whose registry holds a streaming ``NumpyHandler`` subclass
(``deepcopy_host_arrays=False``; same on-disk format and ``np.ndarray`` type string as the
default). Its leaves may be :class:`LazyArray` s: each is produced (read, transposed, cast) only
when orbax is about to write it, with at most ``budget_bytes`` (default 256 MiB, or one larger
tensor) alive at a time, and dropped once written, so a conversion never holds the whole converted
model (peak ~ runtime + budget). This relies on
two private ``NumpyHandler`` hooks (``_background_serialize``, ``_open_and_write``, orbax
0.11-0.12); when they are missing the lazy leaves are materialised up front instead (correct, but
with the parameters' full size in memory). orbax itself is imported on first use, so importing
:mod:`jaxprune.checkpoints` stays cheap.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}``; refuses a name that is also a prefix of another."""
    tree: dict[str, Any] = {}
    for name, v in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"parameter name {name!r} collides with a leaf")
        if leaf in node:
            raise ValueError(f"parameter name {name!r} collides with a subtree")
        node[leaf] = v
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`unflatten` (non-dict values are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


class LazyArray:
    """A NumPy array described by shape and dtype, produced by ``fn()`` only when needed."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, fn: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        a = self._fn()
        if a.shape != self.shape or a.dtype != self.dtype:
            raise AssertionError(f"lazy array produced {a.shape} {a.dtype}, promised {self.shape} {self.dtype}")
        return a

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.materialize()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"


DEFAULT_BUDGET_BYTES = 256 * 1024**2


class _ByteBudget:
    """An asyncio gate admitting work while the bytes in flight stay within ``limit`` (one item always fits)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


def _streaming() -> bool:
    """Whether this orbax has the two private ``NumpyHandler`` hooks the streaming handler overrides."""
    from orbax.checkpoint import type_handlers as th

    return all(hasattr(th.NumpyHandler, m) for m in ("_background_serialize", "_open_and_write"))


@functools.cache
def _streaming_handler_class() -> type:
    from orbax.checkpoint import type_handlers as th

    class StreamingNumpyHandler(th.NumpyHandler):
        """``NumpyHandler`` that materialises :class:`LazyArray` leaves just before writing them, with at most
        ``budget_bytes`` of lazy leaves alive at once (small leaves go in parallel, big ones one by one)."""

        def __init__(self, budget_bytes: int):
            super().__init__(deepcopy_host_arrays=False)
            self._budget_bytes = budget_bytes
            self._budget: _ByteBudget | None = None

        async def _background_serialize(self, values, infos, args=None):
            self._budget = _ByteBudget(self._budget_bytes)  # bound to orbax's background event loop
            return await super()._background_serialize(values, infos, args)

        async def _open_and_write(self, value, tspec, ts_context):
            if not isinstance(value, LazyArray):
                return await super()._open_and_write(value, tspec, ts_context)
            assert self._budget is not None
            await self._budget.acquire(value.nbytes)
            try:
                arr = await asyncio.to_thread(value.materialize)
                await super()._open_and_write(arr, tspec, ts_context)
                del arr
            finally:
                await self._budget.release(value.nbytes)

    return StreamingNumpyHandler


def _checkpointer(budget_bytes: int):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    numpy_handler = (_streaming_handler_class()(budget_bytes) if _streaming()
                     else th.NumpyHandler(deepcopy_host_arrays=False))
    registry = th.create_type_handler_registry(
        (np.ndarray, numpy_handler),
        (LazyArray, numpy_handler),
        (jax.Array, th.ArrayHandler()),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def save_params(path: str | Path, params: Mapping[str, np.ndarray | LazyArray],
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
    """Write ``params`` (flat dotted names -> NumPy arrays or :class:`LazyArray`) to the new orbax dir ``path``.

    At most ``budget_bytes`` of lazy leaves are materialised at once (a larger leaf goes alone).
    """
    import orbax.checkpoint as ocp

    if not _streaming():
        params = {k: v.materialize() if isinstance(v, LazyArray) else v for k, v in params.items()}
    ckptr = _checkpointer(budget_bytes)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))  # orbax logs every save step at INFO/WARNING
    try:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(unflatten(params)))  # synchronous
    finally:
        absl_logger.setLevel(level)
        ckptr.close()


def restore_params(path: str | Path, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Read an orbax parameter directory back into a flat dict of NumPy arrays (cast to ``dtype`` if given)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        meta = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), meta)
        tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        ckptr.close()
    return {k: np.asarray(v) for k, v in flatten(tree).items()}
