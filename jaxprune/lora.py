"""LoRA adapters on the LLaMA decoder's linears: init, apply (pure), merge, save / load with orbax.

For a targeted dense layer with kernel ``W [in, out]`` (our :class:`~jaxprune.models.layers.Linear`
layout, ``y = x @ W``: the transpose of torch's ``weight``), the adapted kernel is::

    W' = W + (alpha / rank) * a @ b        a [in, rank], b [rank, out]

``a`` / ``b`` are the transposes of PEFT's ``lora_A.weight [rank, in]`` / ``lora_B.weight [out, rank]``,
so ``W'.T = W.T + (alpha / rank) * B @ A`` exactly as PEFT merges. Init as PEFT: ``a`` kaiming-uniform
(``U(-1/sqrt(in), 1/sqrt(in))``, PEFT's ``kaiming_uniform_(a=sqrt(5))``), ``b = 0``, so the adapted model
starts equal to the base model.

The adapter pytree is a dict ``{"language.layers.3.self_attn.q_proj": {"a": ..., "b": ...}, ...}``
keyed by the layer's canonical parameter prefix (``param_spec`` names without ``.kernel``); adapters are
float32 whatever the base dtype. :func:`apply_lora` folds them into the parameters (one extra
``in x rank x out`` matmul per layer per call, negligible next to a forward over ``B * T`` tokens), so the
model code is untouched and a training forward is the inference forward on ``apply_lora(params, ...)``.
Consequence: PEFT's per-token ``lora_dropout`` on the adapter input cannot be expressed; ``dropout``
must be 0 (LLaVA-1.5's LoRA recipe uses 0.05).

Defaults ``rank=8, alpha=16`` (alpha = 2 rank, LLaVA-1.5's ``finetune_lora.sh`` ratio; it uses rank 128
for 7B), every attention and MLP projection of every decoder layer (LLaVA / QLoRA practice).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.model import tree_path_name

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
CONFIG_FILE = "lora_config.json"
ARRAYS_DIR = "adapters"
FORMAT = "jaxprune-lora/1"


class LoraError(JaxpruneError, ValueError):
    """Bad LoRA configuration, or adapters that do not fit a model / a checkpoint."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which decoder linears get adapters, of what rank and scale (see the module docstring)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    layers: tuple[int, ...] | None = None   # decoder layer indices; None = every layer
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise LoraError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown or not targets:
            raise LoraError(f"LoraConfig.targets: unknown {unknown or 'empty'}; known decoder linears: {ALL_TARGETS}")
        if len(set(targets)) != len(targets):
            raise LoraError(f"LoraConfig.targets has duplicates: {targets}")
        object.__setattr__(self, "targets", targets)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise LoraError(f"LoraConfig.layers must be non-negative ints (or None = all), got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if self.dropout != 0:
            raise LoraError(f"LoraConfig.dropout={self.dropout}: only 0 is supported (adapters are merged into the "
                            "kernels, so PEFT's per-token dropout on the adapter input has no equivalent)")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": list(self.targets),
                "layers": None if self.layers is None else list(self.layers), "dropout": float(self.dropout)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoraConfig:
        layers = d.get("layers")
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   layers=None if layers is None else tuple(int(i) for i in layers),
                   dropout=float(d.get("dropout", 0.0)))


# ---------------------------------------------------------------------------------------------------
def _module_of(target: str) -> str:
    return "self_attn" if target in ATTN_TARGETS else "mlp"


def _params_of(model_or_params):
    return getattr(model_or_params, "params", model_or_params)


def _kernels(params) -> dict[str, Any]:
    """Decoder linear kernels by prefix: ``{"language.layers.0.self_attn.q_proj": kernel}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = tree_path_name(path)
        if name.startswith("language.layers.") and name.endswith(".kernel"):
            out[name[: -len(".kernel")]] = leaf
    return out


def adapter_names(cfg: LoraConfig, num_layers: int) -> list[str]:
    """The adapter keys ``cfg`` gives a decoder of ``num_layers`` layers (raises on out-of-range layers)."""
    layers = range(num_layers) if cfg.layers is None else cfg.layers
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise LoraError(f"LoraConfig.layers {bad} out of range: the decoder has {num_layers} layers")
    return [f"language.layers.{i}.{_module_of(t)}.{t}" for i in layers for t in cfg.targets]


def _num_layers(kernels: Mapping[str, Any]) -> int:
    ids = {int(n.split(".")[2]) for n in kernels}
    if not ids:
        raise LoraError("no decoder linear kernels found (expected language.layers.<i>.*.kernel parameters)")
    return max(ids) + 1


def init_lora(model_or_params, cfg: LoraConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Fresh adapters for a :class:`~jaxprune.Llava` (or its ``params``): ``a`` kaiming-uniform, ``b = 0``."""
    kernels = _kernels(_params_of(model_or_params))
    names = adapter_names(cfg, _num_layers(kernels))
    keys = jax.random.split(key, len(names))
    out = {}
    for k, name in zip(keys, names):
        din, dout = kernels[name].shape
        bound = 1.0 / math.sqrt(din)
        out[name] = {"a": jax.random.uniform(k, (din, cfg.rank), jnp.float32, -bound, bound),
                     "b": jnp.zeros((cfg.rank, dout), jnp.float32)}
    return out


def check_adapters(params, adapters: Mapping[str, Any], cfg: LoraConfig) -> None:
    """Raise :class:`LoraError` unless ``adapters`` are exactly what ``cfg`` gives these ``params``."""
    kernels = _kernels(_params_of(params))
    want = adapter_names(cfg, _num_layers(kernels))
    missing = sorted(set(want) - set(adapters))
    extra = sorted(set(adapters) - set(want))
    bad = []
    for name in sorted(set(want) & set(adapters)):
        ad = adapters[name]
        if not isinstance(ad, Mapping) or set(ad) != {"a", "b"}:
            bad.append(f"{name}: expected {{'a', 'b'}}, got {sorted(ad) if isinstance(ad, Mapping) else type(ad)}")
            continue
        din, dout = kernels[name].shape
        sa, sb = tuple(np.shape(ad["a"])), tuple(np.shape(ad["b"]))
        if sa != (din, cfg.rank) or sb != (cfg.rank, dout):
            bad.append(f"{name}: a {sa} b {sb}, expected a {(din, cfg.rank)} b {(cfg.rank, dout)}")
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing adapters: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            parts.append(f"adapters the config/model has no layer for: {extra[:6]}{' ...' if len(extra) > 6 else ''}")
        if bad:
            parts.append("mis-shaped: " + "; ".join(bad[:6]))
        raise LoraError(f"adapters do not match the model and LoraConfig(rank={cfg.rank}, targets={cfg.targets}, "
                        f"layers={cfg.layers}): " + "; ".join(parts))


def apply_lora(params, adapters: Mapping[str, Any], cfg: LoraConfig):
    """``params`` (an ``nnx.State``) with ``W + (alpha / rank) a @ b`` on every adapted kernel (pure, jittable).

    The product is formed in float32 and cast to the kernel's dtype."""
    check_adapters(params, adapters, cfg)  # shapes only: fine on tracers
    scale = cfg.scale

    def fold(path, w):
        name = tree_path_name(path)
        if not name.endswith(".kernel"):
            return w
        ad = adapters.get(name[: -len(".kernel")])
        if ad is None:
            return w
        delta = jnp.dot(ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32))
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params)


def merge_lora(model, adapters: Mapping[str, Any], cfg: LoraConfig):
    """A plain :class:`~jaxprune.Llava` whose kernels have the adapters folded in (same dtype and bucket)."""
    from jaxprune.model import Llava

    merged = jax.jit(lambda p, a: apply_lora(p, a, cfg))(model.params, adapters)
    return Llava(model.cfg, model.graphdef, merged, model.dtype, bucket=model.bucket)


def num_params(adapters: Mapping[str, Any]) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(adapters)))


# ---------------------------------------------------------------------------------------------------
# orbax I/O: DIR/adapters (an orbax PyTree checkpoint of {"<prefix with / for .>": {"a", "b"}}) + DIR/lora_config.json.
def _nested(adapters: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ad in adapters.items():
        node = out
        for p in name.split("."):
            node = node.setdefault(p, {})
        node["a"], node["b"] = np.asarray(ad["a"]), np.asarray(ad["b"])
    return out


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and set(v) == {"a", "b"} and not any(isinstance(x, Mapping) for x in v.values()):
            out[prefix + k] = {"a": v["a"], "b": v["b"]}
        elif isinstance(v, Mapping):
            out.update(_flat(v, prefix + k + "."))
        else:
            raise LoraError(f"unexpected leaf {prefix + k!r} in an adapter checkpoint")
    return out


def save_adapters(path: str | os.PathLike, adapters: Mapping[str, Any], cfg: LoraConfig, *,
                  metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``adapters`` + ``cfg`` (+ JSON ``metadata``) to the directory ``path``, atomically: everything
    goes to a temporary sibling that is renamed into place when complete."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    bad = [n for n, ad in adapters.items() if not isinstance(ad, Mapping) or set(ad) != {"a", "b"}]
    if bad:
        raise LoraError(f"not an adapter pytree (need {{'a', 'b'}} per layer): {bad[:4]}")
    ranks = {int(np.shape(ad["a"])[1]) for ad in adapters.values()}
    if ranks != {cfg.rank}:
        raise LoraError(f"adapters have rank(s) {sorted(ranks)}, the config says {cfg.rank}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        ocp.PyTreeCheckpointer().save(tmp / ARRAYS_DIR, _nested(adapters))
        meta = {"format": FORMAT, "config": cfg.to_json(), "adapters": sorted(adapters),
                "metadata": dict(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``lora_config.json`` of an adapter directory (config, adapter names, user metadata)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no LoRA adapter directory at {path}")
    f = path / CONFIG_FILE
    if not f.is_file():
        raise LoraError(f"{path} is not a LoRA adapter directory: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{f}: cannot parse ({e})") from None
    if meta.get("format") != FORMAT:
        raise LoraError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_adapters(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], LoraConfig]:
    """``(adapters, cfg)`` from a directory written by :func:`save_adapters` (NumPy float32 arrays)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_adapter_metadata(path)
    cfg = LoraConfig.from_json(meta["config"])
    arrays = path / ARRAYS_DIR
    if not arrays.is_dir():
        raise LoraError(f"{path}: the adapter arrays ({ARRAYS_DIR}/) are missing")
    tree = ocp.PyTreeCheckpointer().restore(arrays)
    adapters = {k: {"a": np.asarray(v["a"]), "b": np.asarray(v["b"])} for k, v in _flat(tree).items()}
    if sorted(adapters) != sorted(meta["adapters"]):
        raise LoraError(f"{path}: the stored arrays {sorted(set(adapters) ^ set(meta['adapters']))[:6]} do not "
                        "match the adapter list in " + CONFIG_FILE)
    bad = sorted(n for n, ad in adapters.items() if ad["a"].shape[1] != cfg.rank or ad["b"].shape[0] != cfg.rank)
    if bad:
        raise LoraError(f"{path}: adapters {bad[:4]} do not have the configured rank {cfg.rank}")
    return adapters, cfg
