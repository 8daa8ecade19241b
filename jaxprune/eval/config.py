"""What to evaluate: reducer specs, benchmark specs and the sweep configuration (CLI flags or a TOML/JSON file).

A sweep file (``jaxprune-eval --sweep sweep.toml``; JSON with the same keys also works)::

    model = "path/to/llava-hf-or-converted-dir"   # or "demo": the built-in small model (no downloads)
    out = "results/sweep1"                        # relative paths are relative to the sweep file
    batch_size = 8
    # max_new_tokens = 16                         # default: LLaVA's per benchmark (128 short answer, 1024 long)
    on_error = "skip"                             # or "stop"
    # limit = 100                                 # first N questions of each benchmark (file order)
    # bucket = 64                                 # prompt-length bucket: fewer compiled shapes, more padding
    full = true                                   # also run the unreduced model (the "% of full" baseline)

    [benchmarks]
    pope = "playground/data/eval/pope"                       # name = data root
    textvqa = { data = "playground/data/eval/textvqa" }      # or a table: data + loader keyword arguments

    [reducers]                                    # name = [budgets]  (jaxprune.reducers.registry names)
    fastervlm = [192, 128, 64]
    visionzip = [192, 128, 64]

Errors name the item: :class:`ConfigError` for unknown names / bad values (CLI exit status 2),
:class:`ItemError` for data problems such as a missing image or a malformed question file (exit status 1).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from jaxprune.errors import JaxpruneError

#: LLaVA's ``max_new_tokens`` per benchmark (haotian-liu/LLaVA @ c121f04): 128 in ``model_vqa_loader.py`` (VQAv2,
#: GQA, TextVQA, POPE, MME, SEED), 1024 in ``model_vqa.py`` (MM-Vet), ``model_vqa_science.py``,
#: ``model_vqa_mmbench.py``.
SHORT_MAX_NEW_TOKENS = 128
LONG_MAX_NEW_TOKENS = 1024
LONG_ANSWER_BENCHMARKS = frozenset({"mmvet", "scienceqa", "mmbench",
                                    # Video-LLaVA's run_inference_video_qa.py: max_new_tokens=1024
                                    "msvd_qa", "msrvtt_qa", "tgif_qa", "activitynet_qa"})

ON_ERROR = ("stop", "skip")


class EvalError(JaxpruneError):
    """Base of the harness' errors; the message names the item (benchmark, question key, file, reducer)."""

    exit_code = 1


class ConfigError(EvalError):
    """Unknown benchmark / reducer name, malformed reducer spec, bad option value."""

    exit_code = 2


class ItemError(EvalError):
    """A data item cannot be evaluated: missing or undecodable image, malformed question file, bad budget."""

    exit_code = 1


#: lmms-eval's ``max_new_tokens`` per task (EvolvingLMMs-Lab/lmms-eval @ 75571cfe task YAMLs; SEED-Bench and TextVQA
#: set none, so its llava model's default 1024 applies), used with ``protocol="lmms_eval"``.
LMMS_EVAL_MAX_NEW_TOKENS = {"pope": 128, "mme": 16, "scienceqa": 16, "gqa": 16, "vqav2": 16, "mmbench": 1024,
                            "seed": 1024, "textvqa": 1024}


def default_max_new_tokens(benchmark: str, protocol: str = "llava") -> int:
    """LLaVA's generation length for ``benchmark``, or lmms-eval's task setting under ``protocol="lmms_eval"``."""
    if protocol == "lmms_eval" and benchmark in LMMS_EVAL_MAX_NEW_TOKENS:
        return LMMS_EVAL_MAX_NEW_TOKENS[benchmark]
    return LONG_MAX_NEW_TOKENS if benchmark in LONG_ANSWER_BENCHMARKS else SHORT_MAX_NEW_TOKENS


@dataclasses.dataclass(frozen=True)
class ReducerSpec:
    """``name:budget``; ``name == "full"`` (budget None) is the unreduced model."""

    name: str
    budget: int | None = None

    @property
    def is_full(self) -> bool:
        return self.name == "full"

    @property
    def label(self) -> str:
        return "full" if self.is_full else f"{self.name}:{self.budget}"

    @property
    def dirname(self) -> str:
        return "full" if self.is_full else f"{self.name}_{self.budget}"

    @classmethod
    def parse(cls, text: str) -> ReducerSpec:
        """``"fastervlm:64"`` -> ReducerSpec("fastervlm", 64); ``"full"`` -> the unreduced model."""
        s = str(text).strip()
        if s.lower() in ("full", "none", "vanilla"):
            return cls("full")
        name, sep, budget = s.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"reducer {text!r}: expected NAME:BUDGET (e.g. fastervlm:64) or 'full'")
        try:
            b = int(budget)
        except ValueError:
            raise ConfigError(f"reducer {text!r}: budget {budget!r} is not an integer") from None
        if b < 1:
            raise ConfigError(f"reducer {text!r}: budget must be >= 1")
        return cls(name.strip().lower(), b)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str                 # as given (validated / canonicalised by :func:`check_names`)
    data: str                 # root folder handed to ``Benchmark.load``
    options: tuple[tuple[str, Any], ...] = ()   # extra ``load`` keyword arguments

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclasses.dataclass
class SweepConfig:
    """Everything a run needs. ``reducers`` holds the reduced runs; ``full`` adds the unreduced baseline first."""

    model: str
    benchmarks: list[BenchmarkSpec]
    reducers: list[ReducerSpec] = dataclasses.field(default_factory=list)
    out: str = "eval_results"
    full: bool = True
    batch_size: int = 8
    max_new_tokens: int | None = None
    on_error: str = "stop"
    limit: int | None = None
    dtype: str = "float32"
    tokenizer: str | None = None
    image_mode: str = "pad"
    overlay: bool = True
    progress: bool = True
    num_devices: int | None = None
    timing_reps: int = 5
    bucket: int | None = None     # prompt-length bucket of the model (None: jp.load's default, 32 tokens)

    @property
    def runs(self) -> list[ReducerSpec]:
        full = self.full or any(r.is_full for r in self.reducers)
        reduced = [r for r in self.reducers if not r.is_full]
        return list(dict.fromkeys(([ReducerSpec("full")] if full else []) + reduced))

    def check_values(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        for name in ("batch_size", "max_new_tokens", "limit", "num_devices", "timing_reps", "bucket"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.image_mode not in ("pad", "crop"):
            raise ConfigError(f"image_mode must be 'pad' (original LLaVA) or 'crop' (llava-hf), "
                              f"got {self.image_mode!r}")
        if not self.benchmarks:
            raise ConfigError("no benchmark given")


def check_names(cfg: SweepConfig) -> list[tuple[str, str]]:
    """Validate benchmark and reducer names; returns ``[(item, message)]`` for the unknown ones (the caller skips
    them or stops). Known benchmark names are canonicalised in place (aliases such as ``sqa``)."""
    from jaxprune.eval.benchmarks import UnknownBenchmarkError, get_benchmark
    from jaxprune.reducers import registry

    problems: list[tuple[str, str]] = []
    benches = []
    for b in cfg.benchmarks:
        try:
            canon = get_benchmark(b.name).name
        except UnknownBenchmarkError as e:
            problems.append((f"benchmark {b.name}", str(e)))
            continue
        benches.append(dataclasses.replace(b, name=canon))
    cfg.benchmarks = benches
    known = registry.names()
    names = {b.name for b in cfg.benchmarks}
    reducers = []
    for r in cfg.reducers:
        only = None if r.is_full or r.name in known else _benchmark_only(registry, r.name)
        if not r.is_full and r.name not in known and only is None:
            problems.append((f"reducer {r.label}", f"unknown reducer {r.name!r}; known reducers: {', '.join(known)}"))
            continue
        if only is not None and not names <= set(only):
            problems.append((f"reducer {r.label}", f"reducer {r.name!r} runs only on benchmark {', '.join(only)} "
                             f"(it reads per-question reducer_inputs only that benchmark supplies); this sweep has "
                             f"{', '.join(sorted(names - set(only)))}"))
            continue
        reducers.append(r)
    cfg.reducers = reducers
    return problems


_SWEEP_KEYS = {"model", "benchmarks", "reducers", "out", "full", "batch_size", "max_new_tokens", "on_error", "limit",
               "dtype", "tokenizer", "image_mode", "overlay", "progress", "num_devices", "timing_reps", "bucket"}


def _parse_reducers(value: Any, where: str) -> list[ReducerSpec]:
    out: list[ReducerSpec] = []
    if isinstance(value, dict):  # {name: [budgets]} or {name: budget}
        for name, budgets in value.items():
            budgets = budgets if isinstance(budgets, list) else [budgets]
            for b in budgets:
                out.append(ReducerSpec.parse(f"{name}:{b}"))
    elif isinstance(value, list):  # ["name:budget", ...] or [{name=, budgets=[...]}]
        for item in value:
            if isinstance(item, str):
                out.append(ReducerSpec.parse(item))
            elif isinstance(item, dict) and "name" in item:
                budgets = item.get("budgets", item.get("budget"))
                budgets = budgets if isinstance(budgets, list) else [budgets]
                out.extend(ReducerSpec.parse(f"{item['name']}:{b}") for b in budgets)
            else:
                raise ConfigError(f"{where}: reducers entry {item!r} is neither 'name:budget' nor a table with "
                                  "name and budgets")
    else:
        raise ConfigError(f"{where}: 'reducers' must be a table {{name = [budgets]}} or a list")
    return out


def _parse_benchmarks(value: Any, base: Path, where: str) -> list[BenchmarkSpec]:
    def resolve(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    out = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for item in value:
            if not isinstance(item, dict) or "name" not in item:
                raise ConfigError(f"{where}: benchmarks list entries need a 'name' and 'data'")
            items.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
    else:
        raise ConfigError(f"{where}: 'benchmarks' must be a table {{name = data_root}} or a list")
    for name, spec in items:
        if isinstance(spec, str):
            out.append(BenchmarkSpec(name, resolve(spec)))
        elif isinstance(spec, dict) and isinstance(spec.get("data"), str):
            opts = tuple(sorted((k, v) for k, v in spec.items() if k != "data"))
            out.append(BenchmarkSpec(name, resolve(spec["data"]), opts))
        else:
            raise ConfigError(f"{where}: benchmark {name!r} needs a data root (a string or a table with 'data')")
    return out


def load_sweep_file(path: str | Path) -> SweepConfig:
    """Read a TOML (``tomllib``) or JSON sweep file; paths inside are relative to the file's folder."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"sweep file {where}: {e.strerror or e}") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {where}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {where}: the top level must be a table")
    unknown = sorted(set(data) - _SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"sweep file {where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_SWEEP_KEYS))})")
    if "model" not in data or "benchmarks" not in data:
        raise ConfigError(f"sweep file {where}: 'model' and 'benchmarks' are required")
    base = path.resolve().parent
    kw = {k: v for k, v in data.items() if k not in ("benchmarks", "reducers", "model", "out", "tokenizer")}
    model = str(data["model"])
    if model != "demo" and not Path(model).expanduser().is_absolute() and (base / model).exists():
        model = str(base / model)
    out = Path(str(data.get("out", "eval_results"))).expanduser()
    cfg = SweepConfig(model=model, benchmarks=_parse_benchmarks(data["benchmarks"], base, where),
                      reducers=_parse_reducers(data.get("reducers", {}), where),
                      out=str(out if out.is_absolute() else base / out),
                      tokenizer=data.get("tokenizer"), **kw)
    cfg.check_values()
    return cfg


def _benchmark_only(registry, name: str) -> tuple[str, ...] | None:
    """The benchmarks a registered benchmark-only reducer runs on; None for an unknown or unrestricted name."""
    try:
        return registry.benchmarks_of(name)
    except ValueError:
        return None
