"""The built-in default run (``jaxprune-eval`` with no arguments): no downloads, about a minute on 2 CPU cores.

* Model: :data:`DEFAULT_MODEL` names an entry of :data:`BUILTIN_MODELS` (a builder writing a converted jaxprune
  directory with its tokenizer):

  - ``synthvqa`` (the default): the tiny LLaVA trained on the synthetic VQA set (:mod:`jaxprune.eval.synthvqa`),
    shipped as package data in ``jaxprune/eval/synthvqa/checkpoint`` (HF layout; ``$JAXPRUNE_SYNTHVQA_CHECKPOINT``
    points elsewhere) and converted with ``jaxprune.checkpoints`` into the cache (key = hash of the checkpoint's
    bytes). If that checkpoint is missing the run stops with a :class:`~jaxprune.eval.config.ConfigError` naming
    the path: it never falls back to random weights.
  - ``demo``: the small random LLaVA of :mod:`jaxprune.eval.demo_model`, written as an HF checkpoint and converted
    (the real loading path); only when asked for (``--model demo``): its answers are noise.
* Benchmark, per model (:data:`DEFAULT_RUNS`): ``synthvqa`` = the first :data:`SYNTHVQA_QUESTIONS` questions of
  the synthetic test split (seed 0), scored per question type with chance levels; ``shapes`` (demo) = a generated
  POPE-format benchmark (``coco/coco_pope_{split}.json`` + ``val2014/`` PNGs) of coloured squares with yes/no
  labels, so the real POPE loader and scorer run on it.
* Reducers, per model: budgets for 144 visual tokens (48/32/16/8 = LLaVA-1.5's 192/128/64/32 of 576).

``jaxprune-eval --model demo`` (no ``--benchmark``) is the demo's default run, ``--model synthvqa`` the trained one's.
Everything is built once into a cache folder (``$JAXPRUNE_CACHE``, else ``$XDG_CACHE_HOME/jaxprune``, else
``~/.cache/jaxprune``), atomically (temp folder + rename), keyed by a hash of what it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Where the trained synthvqa model's HF checkpoint is shipped (``$JAXPRUNE_SYNTHVQA_CHECKPOINT`` overrides).
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "synthvqa" / "checkpoint"
CHECKPOINT_ENV = "JAXPRUNE_SYNTHVQA_CHECKPOINT"
#: File in a synthvqa checkpoint naming the scene style it was trained on (``{"scene_style": "large"}``); the
#: built-in benchmark is generated in that style (absent: ``"grid"``, the v1-v9 models').
STYLE_FILE = "synthvqa.json"
#: Size of the built-in synthvqa benchmark: the first N questions of the test split, seed 0.
SYNTHVQA_QUESTIONS = 192
SYNTHVQA_SEED = 0


@dataclasses.dataclass(frozen=True)
class DefaultRun:
    """What the no-argument run does with one built-in model."""

    benchmark: str                 # a key of BUILTIN_BENCHMARKS
    reducers: tuple[str, ...]      # ``name:budget`` specs run after the full model
    max_new_tokens: int
    batch_size: int
    timing_reps: int = 5           # TTFT repeats per run


#: the default job's methods on synthvqa: the four this library is built around (ADSC as ``adsc_final``) ...
SEED_METHODS: tuple[str, ...] = ("consensusdrop", "visiondrop", "adafv", "adsc_final")
#: ... and what they are read against: FastV, VisionZip, random pruning and the oracle (the pre-LLM upper bound)
CONTROLS: tuple[str, ...] = ("fastv", "visionzip", "random", "oracle")

DEFAULT_RUNS: dict[str, DefaultRun] = {
    "demo": DefaultRun("shapes", ("fastervlm:48", "fastervlm:16", "visionzip:48", "visionzip:16", "fastv:48"),
                       8, 8),
    # Issue 16: the four seed methods (ConsensusDrop, VisionDrop, AdaFV, ADSC), FastV, VisionZip, random and the
    # oracle at 48 and 16 of 144 tokens (= 192 and 64 of 576). ADSC runs as ``adsc_final`` (budget = tokens left
    # after its last cut, FastV's convention): its *average* budget cannot go below ~37 on the 4-layer decoder.
    # Compiling each run's programs dominates the time (1.5-8 s a run on 2 cores), not the 192 questions; the
    # persistent compilation cache (enable_compile_cache) makes re-runs faster.
    "synthvqa": DefaultRun("synthvqa", tuple(f"{name}:{budget}" for name in SEED_METHODS + CONTROLS
                                             for budget in (48, 16)), 4, 16, timing_reps=3),
}

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
           "white": (250, 250, 250), "black": (10, 10, 10)}
SPLITS = ("adversarial", "popular", "random")


def synthvqa_checkpoint() -> Path:
    """The synthvqa model's HF checkpoint directory (``$JAXPRUNE_SYNTHVQA_CHECKPOINT``, else the shipped one)."""
    env = os.environ.get(CHECKPOINT_ENV)
    return Path(env).expanduser() if env else SHIPPED_CHECKPOINT


def synthvqa_style(src: str | Path | None = None) -> str:
    """The scene style a synthvqa checkpoint (default: :func:`synthvqa_checkpoint`) was trained on, from its
    :data:`STYLE_FILE` (``"grid"`` when the file is absent); an unreadable file or an unknown style is a
    :class:`~jaxprune.eval.config.ConfigError` naming the file."""
    from .config import ConfigError
    from .synthvqa.scene import STYLES

    f = Path(src if src is not None else synthvqa_checkpoint()) / STYLE_FILE
    if not f.is_file():
        return "grid"
    try:
        style = json.loads(f.read_text(encoding="utf-8")).get("scene_style", "grid")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not a JSON object with 'scene_style' ({e})") from None
    if style not in STYLES:
        raise ConfigError(f"{f}: scene_style={style!r} is not one of {STYLES}")
    return style


def model_style(model: str) -> str:
    """:func:`synthvqa_style` of ``model``: the built-in ``synthvqa`` (its checkpoint) or a checkpoint directory
    (``"grid"`` for anything without :data:`STYLE_FILE`)."""
    return synthvqa_style(synthvqa_checkpoint() if model == "synthvqa" else Path(model))


def synthvqa_available() -> bool:
    return (synthvqa_checkpoint() / "config.json").is_file()


def default_model() -> str:
    """The default run's model: always the trained ``synthvqa`` (a missing checkpoint is an error, see
    :func:`check_synthvqa`, never a silent switch to random weights)."""
    return DEFAULT_MODEL


#: The model the default run uses.
DEFAULT_MODEL = "synthvqa"
DEFAULT_REDUCERS = DEFAULT_RUNS[DEFAULT_MODEL].reducers
DEFAULT_BENCHMARK = {"shapes": "pope", "synthvqa": "synthvqa"}[DEFAULT_RUNS[DEFAULT_MODEL].benchmark]
DEFAULT_MAX_NEW_TOKENS = DEFAULT_RUNS[DEFAULT_MODEL].max_new_tokens
DEFAULT_BATCH_SIZE = DEFAULT_RUNS[DEFAULT_MODEL].batch_size


_DIGESTS: dict[tuple, str] = {}


def _files_digest(root: Path) -> str:
    """sha256 over the relative names and bytes of every (non-hidden) file under ``root`` (memoised on the files'
    names, sizes and modification times)."""
    files = sorted(q for q in root.rglob("*") if q.is_file() and not any(
        part.startswith(".") for part in q.relative_to(root).parts))
    sig = tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    if sig not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
        _DIGESTS[sig] = h.hexdigest()
    return _DIGESTS[sig]


def check_synthvqa() -> Path:
    """The synthvqa checkpoint directory, or a :class:`~jaxprune.eval.config.ConfigError` saying where it was
    looked for and what to do (the default run calls this before anything else)."""
    src = synthvqa_checkpoint()
    if (src / "config.json").is_file():
        return src
    from .config import ConfigError

    if os.environ.get(CHECKPOINT_ENV):
        where = f"${CHECKPOINT_ENV} = {src}: no config.json there"
        fix = f"point ${CHECKPOINT_ENV} at an HF checkpoint directory, or unset it to use the shipped one"
    else:
        where = f"the shipped checkpoint {src} is missing (config.json not found)"
        fix = (f"reinstall jaxprune (the checkpoint is package data), or set ${CHECKPOINT_ENV} to an HF checkpoint "
               "directory")
    raise ConfigError(f"built-in model 'synthvqa': no checkpoint: {where}; {fix}. (--model demo runs a "
                      "random-weight model, for testing the pipeline only)")


def _synthvqa_key() -> str:
    return "synthvqa-v1:" + _files_digest(check_synthvqa())


def _synthvqa_builder(dst: Path) -> Path:
    from jaxprune.checkpoints import convert

    return convert(check_synthvqa(), dst)


def _synthvqa_id() -> str:
    return "jaxprune-synthvqa-" + _files_digest(check_synthvqa())[:8]


def _demo_builder(dst: Path) -> Path:
    from .demo_model import write_demo_checkpoint

    return write_demo_checkpoint(dst)


def _demo_key() -> str:
    from .demo_model import DEMO_CFG, DEMO_WORDS

    return repr(DEMO_CFG) + repr(DEMO_WORDS) + "v1"


#: name -> (model id written into answers files (or a function giving it), cache-key function, builder(dst) -> dst)
BUILTIN_MODELS: dict[str, tuple[str | Callable[[], str], Callable[[], str], Callable[[Path], Path]]] = {
    "demo": ("jaxprune-demo-random", _demo_key, _demo_builder),
    "synthvqa": (_synthvqa_id, _synthvqa_key, _synthvqa_builder),
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


def enable_compile_cache() -> Path | None:
    """Use JAX's persistent compilation cache under ``cache_root()/xla`` (re-runs of the default run skip XLA
    compilation, most of its time), unless a cache folder is already configured (``$JAX_COMPILATION_CACHE_DIR``).
    Returns the folder in use (None if JAX refuses)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = cache_root() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (AttributeError, ValueError, OSError):  # an older / newer JAX without these options
        return None
    return path


def is_builtin_model(name: str) -> bool:
    return name in BUILTIN_MODELS


def ensure_model(name: str | None = None) -> tuple[Path, str]:
    """(converted model directory with tokenizer, model id) of a built-in model (default: :func:`default_model`),
    built on first use."""
    name = name or default_model()
    model_id, key, build = BUILTIN_MODELS[name]
    path = _cached(f"model-{name}", key(), build)
    return path, model_id() if callable(model_id) else model_id


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


def _synthvqa_bench_key() -> str:
    """Benchmark settings + the generator's source bytes (a changed generator rebuilds the cached copy)."""
    src = Path(__file__).resolve().parent / "synthvqa"
    h = hashlib.sha256()
    for name in ("scene.py", "questions.py", "dataset.py", "export.py"):
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    return f"synthvqa-test-{SYNTHVQA_SEED}-{SYNTHVQA_QUESTIONS}-{synthvqa_style()}-{h.hexdigest()}"


def write_synthvqa_benchmark(dst: str | Path) -> Path:
    """The built-in synthvqa benchmark: the first :data:`SYNTHVQA_QUESTIONS` test questions (seed 0), in the scene
    style of the synthvqa checkpoint (:func:`synthvqa_style`)."""
    from jaxprune.eval.synthvqa.export import write_benchmark

    return write_benchmark(dst, "test", SYNTHVQA_SEED, n_images=None, n_questions=SYNTHVQA_QUESTIONS,
                           style=synthvqa_style())


#: name -> (benchmark name it is loaded with, cache-key function, builder(dst))
BUILTIN_BENCHMARKS: dict[str, tuple[str, Callable[[], str], Callable[[Path], object]]] = {
    "shapes": ("pope", lambda: "shapes-v1-8", write_shapes_benchmark),
    "synthvqa": ("synthvqa", _synthvqa_bench_key, write_synthvqa_benchmark),
}


def ensure_benchmark(name: str = "shapes") -> Path:
    """Data root of a built-in benchmark (``shapes``: POPE format; ``synthvqa``: the synthetic test slice)."""
    bench, key, build = BUILTIN_BENCHMARKS[name]
    return _cached(f"bench-{name}-{bench}", key(), build)


def default_sweep(out: str | Path, model: str | None = None, **overrides):
    """The :class:`~jaxprune.eval.config.SweepConfig` of the no-argument run of built-in ``model`` (default:
    :func:`default_model`); ``overrides`` (None values ignored) replace its fields."""
    from .config import BenchmarkSpec, ConfigError, ReducerSpec, SweepConfig

    model = model or default_model()
    if model == "synthvqa":
        check_synthvqa()                    # before building the benchmark: a missing model fails first
    if model not in DEFAULT_RUNS:
        raise ConfigError(f"no default run for model {model!r} (built-in: {', '.join(DEFAULT_RUNS)}); "
                          "give --benchmark and --data")
    run = DEFAULT_RUNS[model]
    bench = BUILTIN_BENCHMARKS[run.benchmark][0]
    kw = dict(model=model, benchmarks=[BenchmarkSpec(bench, str(ensure_benchmark(run.benchmark)))],
              reducers=[ReducerSpec.parse(r) for r in run.reducers], out=str(out),
              max_new_tokens=run.max_new_tokens, batch_size=run.batch_size, timing_reps=run.timing_reps)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return SweepConfig(**kw)
