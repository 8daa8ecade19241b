"""Data parallelism for evaluation: one ``data`` mesh axis over every device of every process.

Design (multi-host answers): **one global batch, gathered answers, process 0 writes.**

* Every process loads the same question list and builds the same batch plan (sorted by prompt length, padded to
  the global batch size), so every process runs the same programs in the same order on the same shapes
  (a requirement of multi-controller JAX).
* Rows of a global batch are split by the ``data`` sharding: each process prepares only the rows its own devices
  hold (its images are the only ones it opens), and feeds them with ``jax.make_array_from_process_local_data``.
  Parameters are replicated (``NamedSharding(mesh, P())``).
* Generated token ids are gathered with ``multihost_utils.process_allgather``; only process 0 decodes, writes the
  answers file, reports and plots.  The resume state (which keys are done) is read by process 0 and broadcast with
  ``broadcast_one_to_all``, so the other processes need neither the output folder nor a shared filesystem for it.
* Why not one file per process merged at the end: it needs a shared filesystem and a merge step that can race a
  crash; with gathering, the answers file has a single writer and the crash-safety argument of
  :mod:`jaxprune.eval.answers` holds unchanged.  The cost (a small all-gather of token ids per batch) is
  negligible next to generation.

On CPU the collectives use gloo (``jax_cpu_collectives_implementation``), set by :func:`initialize`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> None:
    """``jax.distributed.initialize`` (arguments None = auto-detect on TPU / SLURM / ...); gloo for CPU collectives.

    Must run before anything touches a JAX backend."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - option absent or renamed in some jax version: CPU collectives then default
        pass
    kw: dict[str, Any] = {}
    if coordinator is not None:
        kw["coordinator_address"] = coordinator
    if num_processes is not None:
        kw["num_processes"] = num_processes
    if process_id is not None:
        kw["process_id"] = process_id
    if local_device_ids is not None:
        kw["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kw)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
    """1-D ``data`` mesh. Single process: the first ``num_devices`` local devices (all by default). Several
    processes: every device of every process (``num_devices`` must then be None or the global count)."""
    devices = jax.devices()
    if jax.process_count() > 1:
        if num_devices not in (None, len(devices)):
            raise ValueError(f"num_devices={num_devices}: a multi-process run uses all {len(devices)} devices")
    elif num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} device(s) are visible")
        devices = devices[:num_devices]
    try:
        from jax.sharding import AxisType

        return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))
    except (ImportError, TypeError):  # pragma: no cover - jax without axis types
        return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of arrays fully replicated on ``mesh`` (every process passes the same values)."""
    rep = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, rep)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, rep, lambda idx: x[idx])

    return jax.tree.map(put, tree)


@functools.lru_cache(maxsize=64)
def _local_range(mesh: Mesh, rows: int) -> tuple[int, int]:
    idx = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    spans = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop) for s in idx.values()})
    lo, hi = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise RuntimeError(f"this process' devices hold non-contiguous batch rows {spans}; the eval harness needs "
                           "each process' devices to be adjacent in the mesh")
    return lo, hi


def local_rows(mesh: Mesh, rows: int) -> range:
    """The global batch rows this process feeds (``rows`` must be a multiple of the mesh size)."""
    lo, hi = _local_range(mesh, rows)
    return range(lo, hi)


def to_global(local: np.ndarray, mesh: Mesh, rows: int) -> jax.Array:
    """Assemble a batch-sharded global array from this process' rows."""
    shape = (rows,) + tuple(local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, shape)


def gather(x: jax.Array) -> np.ndarray:
    """The full value of a global array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate per-process host arrays (process order = row order, see :func:`local_rows`)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def broadcast(x: np.ndarray) -> np.ndarray:
    """Process 0's value of a host array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
