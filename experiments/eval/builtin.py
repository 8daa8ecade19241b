"""The built-in default run (``jaxprune-eval`` with no arguments): no downloads, under a minute on 2 CPU cores.

* Model: :data:`DEFAULT_MODEL` names an entry of :data:`BUILTIN_MODELS` (a builder writing a converted jaxprune
  directory with its tokenizer).  Today that is ``demo``: the small random LLaVA of :mod:`experiments.demo`,
  written as an HF checkpoint and converted with ``checkpoints_convert`` (the real loading path).  A trained
  tiny model replaces it by adding a builder and changing that one constant.
* Benchmark: ``shapes``, a generated POPE-format benchmark (``coco/coco_pope_{split}.json`` + ``val2014/`` PNGs):
  images of coloured squares, "Is there a <colour> square in the image?" with yes/no labels, so the real POPE
  loader and scorer run on it.
* Reducers: :data:`DEFAULT_REDUCERS` (budgets are for the demo's 144 visual tokens: 48/16 = LLaVA's 192/64 of 576).

Everything is built once into a cache folder (``$JAXPRUNE_CACHE``, else ``$XDG_CACHE_HOME/jaxprune``, else
``~/.cache/jaxprune``), atomically (temp folder + rename), keyed by a hash of what it depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: The model the default run (and ``--model demo``) uses.
DEFAULT_MODEL = "demo"
#: Reducer specs of the default run (``name:budget``), after the full model.
DEFAULT_REDUCERS = ("fastervlm:48", "fastervlm:16", "visionzip:48", "visionzip:16", "fastv:48")
DEFAULT_BENCHMARK = "pope"
DEFAULT_MAX_NEW_TOKENS = 8
DEFAULT_BATCH_SIZE = 8

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
           "white": (250, 250, 250), "black": (10, 10, 10)}
SPLITS = ("adversarial", "popular", "random")


def _demo_builder(dst: Path) -> Path:
    from experiments.demo import write_demo_checkpoint

    return write_demo_checkpoint(dst)


def _demo_key() -> str:
    from experiments.demo import DEMO_CFG, DEMO_WORDS

    return repr(DEMO_CFG) + repr(DEMO_WORDS) + "v1"


#: name -> (model id written into answers files, cache-key function, builder(dst) -> dst)
BUILTIN_MODELS: dict[str, tuple[str, Callable[[], str], Callable[[Path], Path]]] = {
    "demo": ("jaxprune-demo-random", _demo_key, _demo_builder),
}


def cache_root() -> Path:
    env = os.environ.get("JAXPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxprune"


def _cached(name: str, key: str, build: Callable[[Path], object]) -> Path:
    """``cache_root()/name-<hash(key)>``, built by ``build(tmpdir)`` once (atomic rename; concurrent builders
    race harmlessly: the loser's copy is discarded)."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    dst = cache_root() / f"{name}-{digest}"
    if dst.is_dir():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dst.parent))
    try:
        build(tmp / "out")
        try:
            os.rename(tmp / "out", dst)
        except OSError:
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def is_builtin_model(name: str) -> bool:
    return name in BUILTIN_MODELS


def ensure_model(name: str = DEFAULT_MODEL) -> tuple[Path, str]:
    """(converted model directory with tokenizer, model id) of a built-in model, built on first use."""
    model_id, key, build = BUILTIN_MODELS[name]
    return _cached(f"model-{name}", key(), build), model_id


def write_shapes_benchmark(dst: str | Path, n_images: int = 8, seed: int = 0) -> Path:
    """POPE-format benchmark of coloured squares: per image one "yes" and one "no" question; questions are dealt
    round-robin to the three POPE splits."""
    import PIL.Image

    dst = Path(dst)
    (dst / "val2014").mkdir(parents=True, exist_ok=True)
    (dst / "coco").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    k = 0
    for i in range(n_images):
        w, h = int(rng.integers(96, 160)), int(rng.integers(96, 160))
        a = (rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)
        present = list(rng.choice(len(names), size=2, replace=False))
        for c in present:
            s = int(rng.integers(24, 40))
            x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            a[y0:y0 + s, x0:x0 + s] = COLOURS[names[c]]
        fname = f"COCO_val2014_{i:012d}.png"
        PIL.Image.fromarray(a).save(dst / "val2014" / fname)
        absent = [j for j in range(len(names)) if j not in present]
        for c, label in ((present[0], "yes"), (absent[int(rng.integers(len(absent)))], "no")):
            split = SPLITS[k % len(SPLITS)]
            rows[split].append({"question_id": len(rows[split]) + 1, "image": fname,
                                "text": f"Is there a {names[c]} square in the image?", "label": label})
            k += 1
    for split, lines in rows.items():
        (dst / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return dst


def ensure_benchmark() -> Path:
    """Data root of the built-in ``shapes`` benchmark (POPE format)."""
    return _cached("bench-shapes-pope", "shapes-v1-8", write_shapes_benchmark)


def default_sweep(out: str | Path, **overrides):
    """The :class:`~experiments.eval.config.SweepConfig` of the no-argument run."""
    from .config import BenchmarkSpec, ReducerSpec, SweepConfig

    kw = dict(model=DEFAULT_MODEL, benchmarks=[BenchmarkSpec(DEFAULT_BENCHMARK, str(ensure_benchmark()))],
              reducers=[ReducerSpec.parse(r) for r in DEFAULT_REDUCERS], out=str(out),
              max_new_tokens=DEFAULT_MAX_NEW_TOKENS, batch_size=DEFAULT_BATCH_SIZE)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return SweepConfig(**kw)
