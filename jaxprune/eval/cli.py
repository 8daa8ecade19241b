"""``jaxprune-eval``: evaluate LLaVA with visual-token reducers on LLaVA's benchmarks.

  jaxprune-eval                                    the default job: the tiny LLaVA trained on the synthetic VQA set
                                                   (shipped with jaxprune), 192 questions of its test split, the full
                                                   model, ConsensusDrop, VisionDrop, AdaFV, ADSC, FastV, VisionZip,
                                                   random and the oracle at 48 and 16 of 144 tokens; no downloads;
                                                   prints the table (accuracy, % of full, TTFT, FLOPs, KV cache) and
                                                   a one-line reading per budget
  jaxprune-eval --model synthvqa|demo              the default job of that built-in model ('demo' = random weights:
                                                   it tests the pipeline, its answers are noise)
  jaxprune-eval --model DIR --benchmark NAME --data ROOT [--reducer NAME:BUDGET ...] [--batch-size 8]
                [--max-new-tokens N] [--out DIR] [--on-error skip|stop] [--limit N]
  jaxprune-eval --sweep sweep.toml                 reducers x budgets x benchmarks (TOML or JSON)

``--benchmark/--data`` may be repeated (paired in order).  The unreduced model always runs too (the "% of full"
baseline) unless ``--no-full``.  Re-running with the same ``--out`` resumes.  Every argument (names, data roots,
the model's config.json, each reducer's budget against that config) is checked before any model is loaded.
Progress: a bar per run on a terminal, one status line per stage otherwise (``--no-progress``: neither).  The
default job keeps JAX's persistent compilation cache in the jaxprune cache folder (``$JAX_COMPILATION_CACHE_DIR``
chooses another).  Multi-host: one process per host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or ``--distributed`` where JAX auto-detects the cluster); process 0 writes every output.

Exit status: 0 done; 1 a data item failed under ``--on-error stop`` (the message names it); 2 bad arguments
(unknown benchmark / reducer names, impossible budgets, missing model or data, incompatible run folders).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _epilog() -> str:
    """Built-in benchmarks with the files each expects, registered reducers, built-in models."""
    from jaxprune.eval import builtin
    from jaxprune.eval.benchmarks import get_benchmark, list_benchmarks
    from jaxprune.reducers import registry

    lines = ["built-in benchmarks (--benchmark NAME --data ROOT), and what ROOT holds:"]
    for name in list_benchmarks():
        bench = get_benchmark(name)
        layout = getattr(bench, "layout", "") or "(see its module docstring)"
        if getattr(bench, "layout_lmms", ""):
            layout += f"; or {bench.layout_lmms}"
        lines += textwrap.wrap(layout, 116, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13,
                               break_on_hyphens=False)
    lines += ["", "--protocol: 'llava' (default) = LLaVA's prompts and official scorers; 'lmms_eval' = lmms-eval's "
              "task prompts", "and scorers (VQAv2 also: vqaeval, vqaeval_2015); every score names its scorer."]
    lines += ["", "registered reducers (--reducer NAME:BUDGET, BUDGET = visual tokens per image in the papers' "
              "convention;", "'full' = the unreduced model):"]
    lines += textwrap.wrap(", ".join(registry.names()), 116, initial_indent="  ", subsequent_indent="  ")
    only = registry.benchmark_only()
    if only:
        lines += textwrap.wrap("benchmark-only: " + ", ".join(f"{n} ({', '.join(b)})" for n, b in only.items()),
                               116, initial_indent="  ", subsequent_indent="  ")
    run = builtin.DEFAULT_RUNS[builtin.DEFAULT_MODEL]
    lines += ["", "built-in models (--model NAME):",
              "  synthvqa   the default: the tiny LLaVA trained on the synthetic VQA set, shipped in",
              f"             jaxprune/eval/synthvqa/checkpoint (${builtin.CHECKPOINT_ENV} points elsewhere);",
              f"             default job: its {builtin.SYNTHVQA_QUESTIONS}-question test slice, full + "
              f"{' '.join(run.reducers)}",
              "  demo       random weights with a word-level tokenizer: tests the pipeline, measures nothing"]
    return "\n".join(lines)


def build_parser(epilog: bool = True) -> argparse.ArgumentParser:
    ap = _Parser(prog="jaxprune-eval", description=__doc__.replace("``", ""), epilog=_epilog() if epilog else None,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_argument_group("what to run")
    what.add_argument("--model", metavar="DIR|NAME", help="model directory (HF LLaVA with config.json, or converted), or a built-in "
                      "model: 'synthvqa' (the default job's trained model) or 'demo' (random weights); a built-in "
                      "model without --benchmark runs its default job")
    what.add_argument("--benchmark", action="append", default=[], metavar="NAME", help="benchmark name (repeatable; see below)")
    what.add_argument("--data", action="append", default=[], metavar="ROOT", help="data root of each --benchmark (see below)")
    what.add_argument("--reducer", action="append", default=[], metavar="NAME:BUDGET",
                      help="reducer spec, e.g. fastervlm:64 (repeatable; see below)")
    what.add_argument("--sweep", metavar="FILE", help="sweep file (TOML or JSON); flags given here override its values")
    what.add_argument("--demo", action="store_true", help="the default job (also what no arguments do); other "
                      "flags override its settings")
    what.add_argument("--no-full", action="store_true", help="do not run the unreduced model")
    how = ap.add_argument_group("how")
    how.add_argument("--batch-size", type=_positive_int, metavar="N", help="global batch size (default 8; rounded up to the "
                     "device count)")
    how.add_argument("--max-new-tokens", type=_positive_int, metavar="N", help="default per benchmark as LLaVA: 128 short / "
                     "1024 long")
    how.add_argument("--out", metavar="DIR", help="output folder (default ./eval_results; the default job uses a temp folder)")
    how.add_argument("--on-error", choices=("skip", "stop"), help="on a bad data item: skip it and report, or stop "
                     "(default)")
    how.add_argument("--limit", type=_positive_int, metavar="N", help="first N questions of each benchmark")
    how.add_argument("--protocol", metavar="NAME", help="prompts + scorer of every benchmark: 'llava' (default, the "
                     "official scripts) or 'lmms_eval' (lmms-eval's tasks); VQAv2 also 'vqaeval', 'vqaeval_2015'")
    how.add_argument("--dtype", choices=DTYPES, help="float32 (default), bfloat16 or float16")
    how.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    how.add_argument("--image-mode", choices=("pad", "crop"), help="'pad' = original LLaVA (default), 'crop' = "
                     "llava-hf processor")
    how.add_argument("--num-devices", type=_positive_int, metavar="N", help="use the first N local devices (single process)")
    how.add_argument("--bucket", type=_positive_int, metavar="TOKENS", help="prompt-length bucket in tokens (default 32): one "
                     "compile per bucket; larger = fewer compiles, more padding")
    how.add_argument("--no-overlay", action="store_true", help="skip the kept-token overlays")
    how.add_argument("--no-progress", action="store_true", help="no progress bars and no status lines")
    how.add_argument("--list", action="store_true", help="list benchmarks and reducers, then exit")
    mh = ap.add_argument_group("multi-host (jax.distributed)")
    mh.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    mh.add_argument("--coordinator", metavar="HOST:PORT", help="HOST:PORT of process 0")
    mh.add_argument("--num-processes", type=_positive_int, metavar="N")
    mh.add_argument("--process-id", type=int, metavar="I")
    return ap


def _config(args: argparse.Namespace):
    """The :class:`SweepConfig` the flags describe (``out`` of the default job is set after validation)."""
    from jaxprune.eval import builtin
    from jaxprune.eval.config import BenchmarkSpec, ConfigError, ReducerSpec, SweepConfig, load_sweep_file

    reducers = []
    for r in args.reducer:
        try:
            reducers.append(ReducerSpec.parse(r))
        except ConfigError as e:
            raise ConfigError(f"argument --reducer: {e}") from None
    from jaxprune.reducers import registry

    for r in reducers:  # before anything is built for a default job (benchmark-only names: checked per sweep)
        if r.is_full:
            continue
        try:
            registry.benchmarks_of(r.name)
        except ValueError:
            raise ConfigError(f"argument --reducer: unknown reducer {r.name!r}; known reducers: "
                              f"{', '.join(registry.names())}") from None
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, on_error=args.on_error,
                  limit=args.limit, dtype=args.dtype, tokenizer=args.tokenizer, image_mode=args.image_mode,
                  num_devices=args.num_devices, bucket=args.bucket)
    common = {k: v for k, v in common.items() if v is not None}
    if args.sweep:
        if args.benchmark or args.model:
            raise ConfigError("argument --sweep: it names the model and benchmarks (drop --model/--benchmark)")
        try:
            cfg = load_sweep_file(args.sweep)
        except ConfigError as e:
            raise ConfigError(f"argument --sweep: {e}") from None
        for k, v in common.items():
            setattr(cfg, k, v)
        if reducers:
            cfg.reducers = reducers
        if args.out:
            cfg.out = args.out
    elif args.benchmark or args.data or (args.model and not builtin.is_builtin_model(args.model)):
        if not args.model:
            raise ConfigError("argument --model: required with --benchmark (a model directory, or 'synthvqa')")
        if not args.benchmark:
            raise ConfigError("argument --benchmark: required with --model DIR / --data (see the list below "
                              "--help)")
        if len(args.data) != len(args.benchmark):
            raise ConfigError(f"argument --data: give one --data per --benchmark ({len(args.benchmark)} "
                              f"benchmark(s), {len(args.data)} --data)")
        cfg = SweepConfig(model=args.model, benchmarks=[BenchmarkSpec(b, d) for b, d in zip(args.benchmark, args.data)],
                          reducers=reducers, out=args.out or "eval_results", **common)
    else:  # no arguments / --demo / a built-in --model alone: that model's default job
        try:
            cfg = builtin.default_sweep(args.out or "", model=args.model, **common)
        except ConfigError as e:
            raise ConfigError(f"argument --model: {e}" if args.model else str(e)) from None
        if reducers:
            cfg.reducers = reducers
    if args.protocol:
        cfg.benchmarks = [BenchmarkSpec(b.name, b.data, tuple(sorted({**b.kwargs, "protocol": args.protocol}.items())))
                          for b in cfg.benchmarks]
    if args.no_full:
        cfg.full = False
    if args.no_overlay:
        cfg.overlay = False
    if args.no_progress:
        cfg.progress = False
    if not cfg.runs:
        raise ConfigError("argument --no-full: nothing to run without any --reducer")
    cfg.check_values()
    return cfg


def _model_config(cfg, flag: str) -> Any:
    """The model's :class:`jaxprune.LlavaConfig`, from its config.json only (no weights are read)."""
    from jaxprune.eval import builtin
    from jaxprune.eval.config import ConfigError

    if cfg.model == "demo":
        from jaxprune.eval.demo_model import DEMO_CFG

        return DEMO_CFG
    if cfg.model == "synthvqa":
        try:
            path = builtin.check_synthvqa()
        except ConfigError as e:
            raise ConfigError(f"argument {flag}: {e}") from None
    else:
        path = Path(cfg.model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"argument {flag}: {cfg.model}: not a directory (nor a built-in model: "
                              f"{', '.join(builtin.BUILTIN_MODELS)})")
    import jaxprune as jp

    try:
        return jp.load_config(path)
    except Exception as e:  # noqa: BLE001 - missing / malformed config.json, an unsupported model: name it
        raise ConfigError(f"argument {flag}: {cfg.model}: cannot read its config ({type(e).__name__}: {e})") from None


def validate(cfg, sweep_file: str | None = None) -> Any:
    """Check every argument of ``cfg`` before any model is loaded: benchmark and reducer names, data roots, the
    tokenizer folder, the model's config.json and each reducer's budget against it. Raises a
    :class:`~jaxprune.eval.config.ConfigError` (exit status 2) naming the argument; returns the model config."""
    from jaxprune.engine import validate_reducer
    from jaxprune.eval.config import ConfigError, check_names
    from jaxprune.reducers import registry

    def flag(name: str) -> str:
        return f"--sweep {sweep_file}" if sweep_file and name in ("--benchmark", "--data", "--model") else name

    problems = check_names(cfg)
    if problems:
        item, msg = problems[0]
        raise ConfigError(f"argument {flag('--benchmark' if item.startswith('benchmark') else '--reducer')}: {msg}")
    for b in cfg.benchmarks:
        if not Path(b.data).expanduser().exists():
            raise ConfigError(f"argument {flag('--data')}: {b.data}: no such directory (data root of benchmark "
                              f"{b.name}; --help lists the files each benchmark expects)")
    for b in cfg.benchmarks:
        protocol = b.kwargs.get("protocol")
        if protocol is not None:
            from jaxprune.eval.benchmarks import get_benchmark

            allowed = getattr(get_benchmark(b.name), "protocols", ("llava",))
            if protocol not in allowed:
                raise ConfigError(f"argument --protocol: {protocol!r} is not a protocol of benchmark {b.name} "
                                  f"(it has: {', '.join(allowed)})")
    if cfg.tokenizer and not Path(cfg.tokenizer).expanduser().is_dir():
        raise ConfigError(f"argument --tokenizer: {cfg.tokenizer}: not a directory")
    mcfg = _model_config(cfg, flag("--model"))
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.video import is_video_model

    for b in cfg.benchmarks:  # video benchmarks need a model with a video path, and Video-LLaVA runs only those
        video_bench = getattr(get_benchmark(b.name), "modality", "image") == "video"
        if video_bench != is_video_model(mcfg):
            raise ConfigError(
                f"argument {flag('--benchmark')}: {b.name} is a video benchmark but the model (model_type "
                f"{mcfg.model_type!r}) has no video input (Video-LLaVA checkpoints, model_type 'video_llava', have)"
                if video_bench else f"argument {flag('--benchmark')}: {b.name} is an image benchmark; the harness "
                f"runs Video-LLaVA models (model_type 'video_llava') on video benchmarks only")
    for spec in cfg.runs:
        if spec.is_full:
            continue
        try:
            validate_reducer(mcfg, registry.make(spec.name, spec.budget, mcfg))
        except ValueError as e:  # BudgetError is a ValueError
            raise ConfigError(f"argument --reducer: {spec.label}: {e}") from None
    return mcfg


def _list() -> int:
    from jaxprune.eval.benchmarks import list_benchmarks
    from jaxprune.reducers import registry

    print("benchmarks:", ", ".join(list_benchmarks()))
    print("reducers:  ", ", ".join(registry.names()))
    for n, b in registry.benchmark_only().items():
        print(f"             {n} (only on {', '.join(b)})")
    return 0


def _reading(cfg, outcome) -> list[str]:
    """The one-line reading per budget (:mod:`jaxprune.eval.reading`) when one benchmark ran ``random``; nothing
    for benchmarks whose headline is not a per-question accuracy."""
    runs = outcome.runs
    if len(cfg.benchmarks) != 1 or not any(r.get("reducer") == "random" for r in runs):
        return []
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval.reading import question_hits, reading_lines

    spec = cfg.benchmarks[0]
    bench = get_benchmark(spec.name)
    try:
        qs = bench.load(spec.data, **spec.kwargs)
        if cfg.limit:
            qs = qs[:cfg.limit]
        hits = {r["run"]: question_hits(bench, qs, r["answers_file"]) for r in runs
                if r.get("reducer") and r.get("answers_file")}
    except (ValueError, OSError, KeyError) as e:
        return [f"(no per-budget reading: {e})"]
    lines = reading_lines(runs, hits)
    return ["", "Reading (best method per budget vs random pruning):", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    console = argv is None  # the console script (tests call main(argv) and keep JAX's compile-cache setting)
    argv = sys.argv[1:] if console else list(argv)
    needs_epilog = any(a in ("-h", "--help") or (len(a) > 2 and "--help".startswith(a)) for a in argv)
    ap = build_parser(epilog=needs_epilog)
    args = ap.parse_args(argv)
    if args.list:
        return _list()
    if args.distributed or args.coordinator:
        from jaxprune.eval.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxprune.eval.config import EvalError

    default_job = not (args.sweep or args.benchmark or args.data or args.model)
    try:
        cfg = _config(args)
        validate(cfg, args.sweep)
        if not cfg.out:  # a built-in model's default job: a fresh temp folder, made once the arguments are valid
            cfg.out = tempfile.mkdtemp(prefix="jaxprune-eval-")
        if console and not (args.sweep or args.benchmark):  # the default job: reuse compiled programs across runs
            from jaxprune.eval import builtin

            builtin.enable_compile_cache()
        from jaxprune.eval import run_sweep

        outcome = run_sweep(cfg)
    except EvalError as e:
        print(f"jaxprune-eval: error: {e}", file=sys.stderr)
        return e.exit_code
    from jaxprune.eval import distributed as dist

    if not dist.is_main():
        return 0
    if default_job or len({r.benchmark for r in outcome.results}) == 1:
        from jaxprune.eval.report import summary_table

        print(summary_table(outcome.runs) if outcome.runs else "no run completed")
        score = (outcome.runs[0].get("score") or {}) if outcome.runs else {}
        if "chance" in score:  # synthvqa: the blind baselines the scores compare with
            print(f"\nBlind baselines on these {score['n']} questions: chance {score['chance']:.1f}%, "
                  f"majority answer per type {score.get('majority', float('nan')):.1f}%")
        for line in _reading(cfg, outcome):
            print(line)
    else:
        print(outcome.markdown)
    if outcome.skipped or any(r.record.get("n_skipped") for r in outcome.results):
        n = len(outcome.skipped) + sum(r.record.get("n_skipped", 0) for r in outcome.results)
        print(f"\n{n} item(s) skipped: see the report", file=sys.stderr)
    print("\n" + "\n".join(f"{k}: {p}" for k, p in outcome.paths.items()))
    return 0 if outcome.results else 1



if __name__ == "__main__":
    raise SystemExit(main())
