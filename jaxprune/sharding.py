"""Meshes and placement: tensor parallel over a ``model`` axis, data parallel over a ``data`` axis.

    mesh = sharding.make_mesh(data=2, model=4)              # 8 devices, axes ('data', 'model')
    model = sharding.shard_model(jp.Llava.random(cfg), mesh)  # place an existing model's parameters
    model = sharding.random_model(cfg, mesh, dtype=jnp.bfloat16)  # init straight into the shards
    model = sharding.load(path, mesh, dtype=jnp.bfloat16)    # checkpoint -> host -> shards
    model(input_ids, pixel_values).logits                    # same API; the batch is split over 'data'

Parameter layout (Megatron-style, expressed as :class:`~jax.sharding.PartitionSpec` per canonical name of
:mod:`jaxprune.models.param_spec`; GSPMD inserts the collectives, the model code is unchanged):

* Llama: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``gate_proj`` / ``up_proj`` kernels ``[in, out]`` are
  column-parallel (``P(None, 'model')``: each device owns whole attention heads and a slice of the MLP);
  ``o_proj`` / ``down_proj`` are row-parallel (``P('model', None)``: a partial sum, all-reduced). Heads split
  in contiguous blocks, so device ``i`` owns K/V heads ``[i K/m, (i+1) K/m)`` and exactly the query heads
  that read them (GQA): ``num_key_value_heads`` and ``intermediate_size`` must be multiples of the model
  axis size ``m`` (:class:`ShardingError` otherwise, naming the numbers).
* Embedding table ``[V, H]``: sharded over the hidden dim ``H`` (``P(None, 'model')``; a row gather then
  needs no communication, unlike a vocab-sharded table); replicated when ``H % m != 0``. ``lm_head``
  ``[H, V]``: sharded over the vocabulary (column-parallel; logits come out vocab-sharded and GSPMD gathers
  them for argmax / output); replicated when ``V % m != 0`` (32064 = 8 x 4008, so LLaVA's vocab splits
  over 2, 4, 8, 16 devices).
* Projector: ``linear_1`` column-parallel, ``linear_2`` row-parallel (replicated if ``H % m != 0``).
* CLIP tower (``vision=``): ``"auto"`` (default) shards it like the decoder (q/k/v + their biases and
  ``fc1`` column-parallel, ``out_proj`` / ``fc2`` row-parallel, their biases replicated) when its heads and
  MLP width divide ``m``, else replicates it (CLIP-L is 0.3 B parameters, 4% of a 7B model);
  ``"shard"`` requires the split (error otherwise); ``"replicate"`` always replicates.
* Norms, biases of row-parallel layers, position / class / patch embeddings, ``image_newline``: replicated.
* Every parameter is replicated over ``data``.

Inputs: :class:`ShardedLlava` (what :func:`shard_model` returns; a :class:`~jaxprune.model.Llava`) places
the bucketed batch (``input_ids``, ``valid``, ``positions``, ``pixel_values``) over ``data`` on the leading
axis before every call, so ``__call__`` / ``generate`` / reducers run data parallel x tensor parallel
through the same jitted functions of ``(params, arrays)``; the batch (and the image count) must be a
multiple of the ``data`` axis size (:class:`ShardingError` otherwise). Reducer paths that build their own
host arrays (LLaVA-NeXT's canonical sequence) pass those replicated; results are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.config import LlavaConfig
from jaxprune.errors import JaxpruneError
from jaxprune.model import Llava, tree_path_name
from jaxprune.models.llava import LlavaModule
from jaxprune.models.param_spec import param_shapes

DATA, MODEL = "data", "model"
VISION_POLICIES = ("auto", "shard", "replicate")

_COL, _ROW, _REP = P(None, MODEL), P(MODEL, None), P()


class ShardingError(JaxpruneError, ValueError):
    """A mesh / config / batch combination that cannot be placed; the message names the numbers."""


# ---------------------------------------------------------------------------------------------------
# Mesh
def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh with axes named ``'data'`` and ``'model'`` over the first ``data * model``
    devices (``jax.devices()`` unless ``devices`` is given). Axes are ``Auto`` (GSPMD propagates shardings
    through the unannotated model code)."""
    if int(data) < 1 or int(model) < 1:
        raise ShardingError(f"mesh axis sizes must be >= 1, got data={data}, model={model}")
    devs = list(jax.devices() if devices is None else devices)
    n = int(data) * int(model)
    if n > len(devs):
        raise ShardingError(f"a data={data} x model={model} mesh needs {n} devices, only {len(devs)} available")
    arr = np.asarray(devs[:n], dtype=object).reshape(int(data), int(model))
    try:
        from jax.sharding import AxisType

        return Mesh(arr, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))
    except (ImportError, TypeError):  # pragma: no cover - jax without axis types
        return Mesh(arr, (DATA, MODEL))


def _axis(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.shape else 1


# ---------------------------------------------------------------------------------------------------
# Parameter layout
def _vision_sharded(cfg: LlavaConfig, m: int, vision: str) -> bool:
    if vision not in VISION_POLICIES:
        raise ShardingError(f"vision={vision!r}: expected one of {VISION_POLICIES}")
    if vision == "replicate" or m == 1:
        return False
    v = cfg.vision
    bad = [f"{n}={x}" for n, x in (("vision_config.num_attention_heads", v.num_attention_heads),
                                   ("vision_config.intermediate_size", v.intermediate_size)) if x % m]
    if bad and vision == "shard":
        raise ShardingError(f"cannot shard the CLIP tower over a model axis of size {m}: {', '.join(bad)} "
                            f"not divisible by {m} (use vision='replicate' or 'auto')")
    return not bad


def check_model_axis(cfg: LlavaConfig, m: int) -> None:
    """Raise :class:`ShardingError` unless the decoder splits evenly over ``m`` model-parallel devices."""
    t = cfg.text
    if t.num_key_value_heads % m:
        raise ShardingError(
            f"text_config.num_key_value_heads={t.num_key_value_heads} is not divisible by the model axis size "
            f"{m}: tensor parallelism gives each device whole K/V heads (and the {t.num_attention_heads // t.num_key_value_heads} "
            f"query heads of each, GQA); use a model axis that divides {t.num_key_value_heads}")
    if t.intermediate_size % m:
        raise ShardingError(f"text_config.intermediate_size={t.intermediate_size} is not divisible by the model "
                            f"axis size {m}")


def partition_specs(cfg: LlavaConfig, model_axis: int, vision: str = "auto") -> dict[str, P]:
    """``{canonical parameter name: PartitionSpec}`` for every parameter of ``cfg`` (see the module docstring)."""
    m = int(model_axis)
    check_model_axis(cfg, m)
    vis = _vision_sharded(cfg, m, vision)
    shapes = param_shapes(cfg)
    if m == 1:
        return {k: _REP for k in shapes}
    H, V = cfg.text.hidden_size, cfg.text.vocab_size
    out: dict[str, P] = {}
    for name in shapes:
        parts = name.split(".")
        leaf = ".".join(parts[-2:])
        spec = _REP
        if parts[0] == "language":
            if parts[1] == "layers":
                if leaf in ("q_proj.kernel", "k_proj.kernel", "v_proj.kernel", "gate_proj.kernel", "up_proj.kernel"):
                    spec = _COL
                elif leaf in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):  # Qwen2: with their column-parallel kernel
                    spec = P(MODEL)
                elif leaf in ("o_proj.kernel", "down_proj.kernel"):
                    spec = _ROW
            elif name == "language.embed_tokens.embedding" and H % m == 0:
                spec = _COL  # [V, H]: hidden-sharded
        elif name == "lm_head.kernel" and V % m == 0:
            spec = _COL  # [H, V]: vocab-sharded
        elif parts[0] == "projector" and H % m == 0:
            spec = {"linear_1.kernel": _COL, "linear_1.bias": P(MODEL), "linear_2.kernel": _ROW}.get(leaf, _REP)
        elif parts[0] in ("vision", "image_tower", "video_tower") and vis and len(parts) > 2 and parts[1] == "layers":
            spec = {"q_proj.kernel": _COL, "k_proj.kernel": _COL, "v_proj.kernel": _COL, "fc1.kernel": _COL,
                    "q_proj.bias": P(MODEL), "k_proj.bias": P(MODEL), "v_proj.bias": P(MODEL),
                    "fc1.bias": P(MODEL), "out_proj.kernel": _ROW, "fc2.kernel": _ROW}.get(leaf, _REP)
        out[name] = spec
    return out


def state_shardings(cfg: LlavaConfig, mesh: Mesh, vision: str = "auto", dtype=jnp.float32):
    """A pytree shaped like the model's ``nnx.State`` whose leaves are the parameters' ``NamedSharding``s
    (usable as ``out_shardings`` / ``device_put`` target)."""
    specs = partition_specs(cfg, _axis(mesh, MODEL), vision)
    _, abstract = Llava.abstract(cfg, dtype)

    def leaf(path, _):
        name = tree_path_name(path)
        if name not in specs:  # pragma: no cover - param_spec and the module disagree (tested elsewhere)
            raise ShardingError(f"parameter {name} has no sharding rule")
        return NamedSharding(mesh, specs[name])

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# ---------------------------------------------------------------------------------------------------
# Inputs
def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over ``data``, the rest replicated (over ``model`` too)."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh, name: str = "batch"):
    """Place ``x`` with its leading axis split over ``data``; the size must divide (clear error otherwise)."""
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    d = _axis(mesh, DATA)
    if x.shape[0] % d:
        raise ShardingError(f"{name} has {x.shape[0]} rows, which does not divide over the mesh's data axis of "
                            f"size {d}: pad the batch to a multiple of {d}")
    return jax.device_put(x, data_sharding(mesh, x.ndim))


class ShardedLlava(Llava):
    """A :class:`~jaxprune.model.Llava` whose parameters live on ``mesh`` and whose batches are split over its
    ``data`` axis. Same API and the same jitted functions (GSPMD partitions them from the input shardings)."""

    def __init__(self, cfg, graphdef, params, dtype=jnp.float32, bucket: int = 32, *, mesh: Mesh):
        super().__init__(cfg, graphdef, params, dtype, bucket)
        self.mesh = mesh

    def put_arrays(self, arrays: dict) -> dict:
        """Rows (``input_ids`` / ``valid`` / ``positions``) split over ``data``; per-image arrays (pixels, family
        tables) split too when their count divides the axis, else replicated."""
        d = _axis(self.mesh, DATA)
        B = np.shape(arrays["input_ids"])[0]
        if B % d:
            raise ShardingError(f"batch of {B} rows does not divide over the mesh's data axis of size {d}: pad the "
                                f"batch to a multiple of {d}")

        def put(path, x):
            name = tree_path_name(path)
            x = np.asarray(x)
            if name in ("input_ids", "valid", "positions"):
                return shard_batch(x, self.mesh, name)
            if x.ndim and x.shape[0] % d == 0:
                return shard_batch(x, self.mesh, name)
            return jax.device_put(x, NamedSharding(self.mesh, P()))

        return jax.tree_util.tree_map_with_path(put, arrays)


# ---------------------------------------------------------------------------------------------------
# Building sharded models
def shard_model(model: Llava, mesh: Mesh, vision: str = "auto") -> ShardedLlava:
    """``model``'s parameters placed on ``mesh`` (``jax.device_put`` onto :func:`state_shardings`)."""
    sh = state_shardings(model.cfg, mesh, vision, model.dtype)
    params = jax.device_put(model.params, sh)
    return ShardedLlava(model.cfg, model.graphdef, params, model.dtype, model.bucket, mesh=mesh)


def init_params(cfg: LlavaConfig, seed: int = 0, dtype=jnp.float32, shardings=None):
    """Random parameters (``Llava.random``'s initialisers) computed by one jitted program whose outputs land
    directly in ``shardings`` (a :func:`state_shardings` tree; ``None``: the default device): no device ever
    holds the whole model. Bit-identical for every sharding (threefry is partitionable); differs from the
    eager ``Llava.random`` by float rounding in the fused normal transform (~1 ulp)."""
    def init():
        return nnx.split(LlavaModule(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    return jax.jit(init, out_shardings=shardings)()


def init_kind(name: str) -> str:
    """How ``Llava.random`` initialises the parameter ``name``: ``"ones"`` (norm scales), ``"zeros"`` (biases) or
    ``"normal"`` (kernels, embeddings, CLS / newline vectors: N(0, 0.02^2))."""
    leaf = name.rsplit(".", 1)[-1]
    return {"scale": "ones", "bias": "zeros"}.get(leaf, "normal")


def per_shape_params(cfg: LlavaConfig, seed: int = 0, dtype=jnp.float32, shardings=None):
    """Random parameters made by one small jitted program per distinct (kind, shape, dtype, sharding), reused
    over the identical layers: compile time stays constant in depth (a 7B model compiles ~20 tiny programs
    instead of one program holding every parameter's RNG, whose GPU compile took 9+ minutes). Same shapes,
    dtypes, shardings and initialiser kinds (:func:`init_kind`) as :func:`init_params`, different random values
    (each parameter draws from ``fold_in(key(seed), index)``): for benchmarks, whose speed does not depend on the
    values. Deterministic for a given ``seed`` and config."""
    graphdef, state = Llava.abstract(cfg, dtype)
    sh = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    programs: dict = {}
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        abstract = var.get_value()
        kind, shape, dt = init_kind(".".join(str(p) for p in path)), abstract.shape, abstract.dtype
        target = sh.get(path)
        target = target.get_value() if isinstance(target, nnx.Variable) else target
        k = (kind, shape, str(dt), target)
        if k not in programs:
            def fn(key, kind=kind, shape=shape, dt=dt):
                if kind == "ones":
                    return jnp.ones(shape, dt)
                if kind == "zeros":
                    return jnp.zeros(shape, dt)
                return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)
            programs[k] = jax.jit(fn, out_shardings=target)
        var.set_value(programs[k](jax.random.fold_in(key, i)))
    return state


def random_model(cfg: LlavaConfig, mesh: Mesh | None = None, seed: int = 0, dtype=jnp.float32,
                 vision: str = "auto", bucket: int = 32, init: str = "program") -> Llava:
    """A random-weight model initialised on device(s): sharded on ``mesh`` (:class:`ShardedLlava`), or on the
    default device when ``mesh`` is None (a plain :class:`Llava` with the same values). ``init="program"``: one
    jitted program (:func:`init_params`, values equal for every mesh); ``"per_shape"``: :func:`per_shape_params`
    (fast to compile at 7B; other values)."""
    if init not in ("program", "per_shape"):
        raise ShardingError(f"random_model: init must be 'program' or 'per_shape', got {init!r}")
    graphdef, _ = Llava.abstract(cfg, dtype)
    make = init_params if init == "program" else per_shape_params
    if mesh is None:
        return Llava(cfg, graphdef, make(cfg, seed, dtype), dtype, bucket)
    params = make(cfg, seed, dtype, state_shardings(cfg, mesh, vision, dtype))
    return ShardedLlava(cfg, graphdef, params, dtype, bucket, mesh=mesh)


def from_params(cfg: LlavaConfig, flat: Mapping[str, Any], mesh: Mesh, dtype=jnp.float32, vision: str = "auto",
                bucket: int = 32) -> ShardedLlava:
    """Canonical flat (host) parameters -> a sharded model; each array goes from the host straight to its
    shards (``jax.device_put`` with its ``NamedSharding``), never whole onto one device."""
    expected = param_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    bad = sorted(k for k in set(expected) & set(flat) if tuple(np.shape(flat[k])) != expected[k])
    if missing or unexpected or bad:
        raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {bad}")
    specs = partition_specs(cfg, _axis(mesh, MODEL), vision)
    graphdef, state = Llava.abstract(cfg, dtype)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        host = np.asarray(flat[name]).astype(jnp.dtype(dtype))
        var.set_value(jax.device_put(host, NamedSharding(mesh, specs[name])))
    return ShardedLlava(cfg, graphdef, state, dtype, bucket, mesh=mesh)


def load(path, mesh: Mesh, dtype=jnp.float32, *, vision: str = "auto", clip_dir=None, bucket: int = 32
         ) -> ShardedLlava:
    """``jp.load`` onto a mesh: the checkpoint is read to host memory, then each parameter is placed shard by
    shard (:func:`from_params`)."""
    from jaxprune.checkpoints import load_params

    cfg, flat = load_params(path, dtype=None, clip_dir=clip_dir)
    return from_params(cfg, flat, mesh, dtype, vision, bucket)


def describe(model: Llava) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """``{name: (partition spec as a tuple, shape of one addressable shard)}`` of a model's parameters."""
    out = {}
    for path, var in nnx.to_flat_state(model.params):
        x = var.get_value()
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        shard = x.addressable_shards[0].data.shape if hasattr(x, "addressable_shards") else np.shape(x)
        out[".".join(str(p) for p in path)] = (() if spec is None else tuple(spec), tuple(shard))
    return out


__all__ = ["DATA", "MODEL", "ShardedLlava", "ShardingError", "check_model_axis", "data_sharding", "describe",
           "from_params", "init_kind", "init_params", "load", "make_mesh", "partition_specs", "per_shape_params", "random_model", "shard_batch",
           "shard_model", "state_shardings"]
