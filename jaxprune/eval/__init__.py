"""Evaluation harness: batched, resumable, data-parallel greedy evaluation of LLaVA + visual-token reducers.

    from jaxprune.eval import SweepConfig, BenchmarkSpec, ReducerSpec, run_sweep
    cfg = SweepConfig(model="path/to/model", benchmarks=[BenchmarkSpec("pope", "data/pope")],
                      reducers=[ReducerSpec.parse("fastervlm:64")], out="results/run1")
    outcome = run_sweep(cfg)            # answers, scores, efficiency, report.md / report.json / pareto.png

Modules: ``config`` (specs, sweep files, errors), ``batching`` (prompts, tokens, static batches), ``engine``
(compiled prefill/decode over the ``data`` mesh), ``runner`` (one benchmark x one reducer, resumable),
``sweep`` (many runs + reports), ``efficiency``, ``report``, ``overlay``, ``distributed`` (multi-device and
multi-host), ``answers`` (the crash-safe answers file), ``builtin`` (the no-download default run).
The command line is ``jaxprune-eval`` (:mod:`jaxprune.eval.cli`).
"""

from .config import BenchmarkSpec, ConfigError, EvalError, ItemError, ReducerSpec, SweepConfig, load_sweep_file
from .runner import Context, RunOptions, RunResult, run_benchmark
from .sweep import SweepOutcome, load_model, load_tokenizer, run_sweep

__all__ = ["BenchmarkSpec", "ConfigError", "Context", "EvalError", "ItemError", "ReducerSpec", "RunOptions",
           "RunResult", "SweepConfig", "SweepOutcome", "load_model", "load_sweep_file", "load_tokenizer",
           "run_benchmark", "run_sweep"]
