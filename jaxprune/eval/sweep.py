"""Sweeps: reducers x budgets x benchmarks from one :class:`SweepConfig`, then overlays and reports.

Output layout (``OUT`` = ``cfg.out``)::

    OUT/report.md            accuracy table (+ % of full, Avg.), efficiency table, skipped items, notes
    OUT/report.json          meta + per-method summary + every run.json + skipped items
    OUT/pareto.png           accuracy vs TTFT and vs visual tokens
    OUT/overlays/<reducer>.png   kept visual tokens over sample images, one row per budget
    OUT/<benchmark>/<run>/answers.jsonl | run.json | run_config.json | <submission file>

Error policy (``cfg.on_error``): unknown benchmark / reducer names, malformed question files, missing images
and impossible budgets raise an :class:`EvalError` naming the item under ``stop``; under ``skip`` the item is
left out, the sweep goes on, and the report lists it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import builtin
from . import distributed as dist
from .config import ConfigError, EvalError, ItemError, SweepConfig, check_names
from .prefetch import CompileAhead
from .runner import PROMPT_FORMAT, Context, RunOptions, RunResult, run_benchmark


@dataclasses.dataclass
class SweepOutcome:
    results: list[RunResult]
    skipped: list[dict[str, str]]      # {"item", "message"} for benchmarks / runs left out
    paths: dict[str, Path]             # report files (process 0 only)
    markdown: str

    @property
    def runs(self) -> list[dict[str, Any]]:
        return [r.record for r in self.results]


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer as a ``PreTrainedTokenizerFast`` from ``tokenizer.json`` (+ its config files).

    A config naming a model-specific class (e.g. ``LlamaTokenizer``) goes through ``AutoTokenizer`` (slower: it
    imports torch where installed); a generic one is loaded directly."""
    path = Path(path)
    from ._hf import quiet_transformers

    quiet_transformers()
    from transformers import PreTrainedTokenizerFast

    cfg_file = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() and not cfg_file.is_file():
        raise ConfigError(f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json): pass --tokenizer DIR")
    cls = None
    if cfg_file.is_file():
        try:
            cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_file}: cannot parse ({e})") from None
    try:
        if cls in (None, "PreTrainedTokenizerFast", "TokenizersBackend"):
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load the tokenizer: {e}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(f"{path}: the tokenizer is not a fast (tokenizers-backed) tokenizer: {type(tok).__name__}")
    return tok


def load_model(name: str, dtype: str = "float32", tokenizer: str | None = None, bucket: int | None = None
               ) -> tuple[Any, Any, str, Path]:
    """(model, tokenizer, model id, model dir) for a built-in name (``demo``) or a model directory."""
    import jax.numpy as jnp

    import jaxprune as jp

    if builtin.is_builtin_model(name):
        path, model_id = builtin.ensure_model(name)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model {name!r}: not a directory (nor a built-in model: "
                              f"{', '.join(builtin.BUILTIN_MODELS)})")
        model_id = path.resolve().name
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype {dtype!r} is not a JAX dtype (float32, bfloat16, float16)") from None
    try:
        model = jp.load(path, dtype=dt, **({"bucket": bucket} if bucket else {}))
    except Exception as e:  # noqa: BLE001 - conversion / config errors: name the model
        raise ConfigError(f"model {name!r}: cannot load: {type(e).__name__}: {e}") from None
    tok = load_tokenizer(Path(tokenizer).expanduser() if tokenizer else path)
    return model, tok, model_id, path


def _log(msg: str) -> None:
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def run_sweep(cfg: SweepConfig, *, context: Context | None = None, after_batch: Callable[[int], None] | None = None
              ) -> SweepOutcome:
    """Run every (benchmark, reducer spec) of ``cfg``; write overlays and reports (process 0)."""
    from jaxprune.eval.benchmarks import get_benchmark

    cfg.check_values()
    stop = cfg.on_error == "stop"
    skipped: list[dict[str, str]] = []

    def fail(item: str, err: Exception) -> None:
        if stop:
            raise err
        _log(f"skipped {item}: {err}")
        skipped.append({"item": item, "message": str(err)})

    for item, msg in check_names(cfg):
        fail(item, ConfigError(msg))
    # every benchmark's questions are read before the model is loaded: a malformed file fails in seconds
    loaded = []
    for bspec in cfg.benchmarks:
        bench = get_benchmark(bspec.name)
        try:
            questions = bench.load(bspec.data, **bspec.kwargs)
        except (OSError, ValueError, KeyError) as e:  # BenchmarkFormatError is a ValueError
            fail(f"benchmark {bspec.name}", ItemError(f"benchmark {bspec.name} ({bspec.data}): {e}"))
            continue
        if cfg.limit is not None:
            questions = questions[:cfg.limit]
        if not questions:
            fail(f"benchmark {bspec.name}", ItemError(f"benchmark {bspec.name} ({bspec.data}): no questions"))
            continue
        loaded.append((bench, questions))
    if context is None:
        t0 = time.perf_counter()
        model, tok, model_id, model_dir = load_model(cfg.model, cfg.dtype, cfg.tokenizer, cfg.bucket)
        context = Context.create(model, tok, model_id, num_devices=cfg.num_devices, image_mode=cfg.image_mode,
                                 model_dir=model_dir)
        if cfg.progress:
            _log(f"model {cfg.model} ({model_id}, {context.dtype}) loaded in {time.perf_counter() - t0:.1f} s")
    out = Path(cfg.out)
    opts = RunOptions(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, on_error=cfg.on_error,
                      progress=cfg.progress, timing_reps=cfg.timing_reps, after_batch=after_batch)
    results: list[RunResult] = []
    samples = []
    for bench, questions in loaded:
        if not samples:
            samples = _overlay_samples(questions)
        ahead = CompileAhead(context, cfg.runs, bench.name)
        bopts = dataclasses.replace(opts, first_rows=ahead.first_rows, before_timing=ahead.quiet)
        try:
            for spec in cfg.runs:
                try:
                    results.append(run_benchmark(context, bench, questions, spec, out / bench.name / spec.dirname,
                                                 bopts))
                except EvalError as e:
                    fail(f"{bench.name}/{spec.label}", e)
        finally:
            ahead.close()
    overlays: list[Path] = []
    paths: dict[str, Path] = {}
    text = ""
    if dist.is_main():
        from . import report

        if not report.plotting_available():
            _log(report.NO_PLOTS)
        elif cfg.overlay and samples and any(not s.is_full for s in cfg.runs):
            from .overlay import draw_overlays

            overlays = draw_overlays(context, cfg.runs, samples, out / "overlays")
        from .efficiency import device_description

        meta = {"model": cfg.model, "model_id": context.model_id, "dtype": context.dtype,
                "devices": device_description(context.mesh), "batch_size": cfg.batch_size, "prompt": PROMPT_FORMAT,
                "image_mode": cfg.image_mode, "max_new_tokens": cfg.max_new_tokens or "LLaVA default per benchmark",
                "benchmarks": [dataclasses.asdict(b) for b in cfg.benchmarks],
                "runs": [s.label for s in cfg.runs]}
        runs = [r.record for r in results]
        paths = report.write_reports(out, runs, skipped, meta, overlays)
        text = paths["markdown"].read_text()
        for p in overlays:
            paths[f"overlay:{p.stem}"] = p
    dist.barrier("jaxprune-eval-sweep-done")
    return SweepOutcome(results, skipped, paths, text)


def _overlay_samples(questions, n: int = 2):
    return [q for q in questions if q.has_image][:n]
