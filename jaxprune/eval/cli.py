"""``jaxprune-eval``: evaluate LLaVA with visual-token reducers on LLaVA's benchmarks.

  jaxprune-eval                                    built-in default: the tiny LLaVA trained on the synthetic VQA
                                                   set (the random demo model until its checkpoint is shipped),
                                                   its test slice, full + reducers at 16/8 of 144 tokens; no
                                                   downloads; prints the table
  jaxprune-eval --model demo|synthvqa              the default run of that built-in model
  jaxprune-eval --model DIR --benchmark NAME --data ROOT [--reducer NAME:BUDGET ...] [--batch-size 8]
                [--max-new-tokens N] [--out DIR] [--on-error skip|stop] [--limit N]
  jaxprune-eval --sweep sweep.toml                 reducers x budgets x benchmarks (TOML or JSON)

``--benchmark/--data`` may be repeated (paired in order).  The unreduced model always runs too (the "% of full"
baseline) unless ``--no-full``.  Re-running with the same ``--out`` resumes.  The built-in default run keeps JAX's
persistent compilation cache in the jaxprune cache folder (re-runs skip most compilation;
``$JAX_COMPILATION_CACHE_DIR`` chooses another folder).  Multi-host: start one process per host with
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed`` where JAX auto-detects the
cluster); process 0 writes every output.

Exit status: 0 done; 1 a data item failed under ``--on-error stop`` (the message names it); 2 bad arguments,
unknown benchmark / reducer names or incompatible run folders.
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxprune-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_argument_group("what to run")
    what.add_argument("--model", help="model directory (HF LLaVA or converted), or a built-in model: 'synthvqa' "
                      "(trained on the synthetic VQA set) or 'demo' (random weights); a built-in model without "
                      "--benchmark runs its default benchmark and reducers")
    what.add_argument("--benchmark", action="append", default=[], help="benchmark name (repeatable)")
    what.add_argument("--data", action="append", default=[], help="data root of each --benchmark")
    what.add_argument("--reducer", action="append", default=[], metavar="NAME:BUDGET",
                      help="reducer spec, e.g. fastervlm:64 (repeatable)")
    what.add_argument("--sweep", help="sweep file (TOML or JSON); flags given here override its values")
    what.add_argument("--demo", action="store_true", help="the built-in default run (also what no arguments do); "
                      "other flags override its settings")
    what.add_argument("--no-full", action="store_true", help="do not run the unreduced model")
    how = ap.add_argument_group("how")
    how.add_argument("--batch-size", type=int, help="global batch size (default 8; rounded up to the device count)")
    how.add_argument("--max-new-tokens", type=int, help="default per benchmark as LLaVA: 128 short / 1024 long")
    how.add_argument("--out", help="output folder (default ./eval_results; the default run uses a temp folder)")
    how.add_argument("--on-error", choices=("skip", "stop"), help="on a bad item: skip it and report, or stop "
                     "(default)")
    how.add_argument("--limit", type=int, help="first N questions of each benchmark")
    how.add_argument("--dtype", help="float32 (default) or bfloat16")
    how.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    how.add_argument("--image-mode", choices=("pad", "crop"), help="'pad' = original LLaVA (default), 'crop' = "
                     "llava-hf processor")
    how.add_argument("--num-devices", type=int, help="use the first N local devices (single process)")
    how.add_argument("--bucket", type=int, help="prompt-length bucket in tokens (default 32): one compile per "
                     "bucket; larger = fewer compiles, more padding")
    how.add_argument("--no-overlay", action="store_true", help="skip the kept-token overlays")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument("--list", action="store_true", help="list benchmarks and reducers, then exit")
    mh = ap.add_argument_group("multi-host (jax.distributed)")
    mh.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    mh.add_argument("--coordinator", help="HOST:PORT of process 0")
    mh.add_argument("--num-processes", type=int)
    mh.add_argument("--process-id", type=int)
    return ap


def _config(args: argparse.Namespace, ap: argparse.ArgumentParser):
    from jaxprune.eval import builtin
    from jaxprune.eval.config import BenchmarkSpec, ConfigError, ReducerSpec, SweepConfig, load_sweep_file

    reducers = [ReducerSpec.parse(r) for r in args.reducer]
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, on_error=args.on_error,
                  limit=args.limit, dtype=args.dtype, tokenizer=args.tokenizer, image_mode=args.image_mode,
                  num_devices=args.num_devices, bucket=args.bucket)
    common = {k: v for k, v in common.items() if v is not None}
    if args.sweep:
        if args.benchmark or args.model:
            ap.error("--sweep takes the model and benchmarks from the file (drop --model/--benchmark)")
        cfg = load_sweep_file(args.sweep)
        for k, v in common.items():
            setattr(cfg, k, v)
        if reducers:
            cfg.reducers = reducers
        if args.out:
            cfg.out = args.out
    elif args.benchmark or (args.model and not builtin.is_builtin_model(args.model)):
        if not args.model:
            ap.error("--model is required (a model directory, or 'demo')")
        if not args.benchmark:
            ap.error("--benchmark is required with --model")
        if len(args.data) != len(args.benchmark):
            ap.error(f"give one --data per --benchmark ({len(args.benchmark)} benchmark(s), {len(args.data)} --data)")
        cfg = SweepConfig(model=args.model, benchmarks=[BenchmarkSpec(b, d) for b, d in zip(args.benchmark, args.data)],
                          reducers=reducers, out=args.out or "eval_results", **common)
    else:  # no arguments / --demo / a built-in --model alone: that model's default run
        out = args.out or tempfile.mkdtemp(prefix="jaxprune-eval-demo-")
        cfg = builtin.default_sweep(out, model=args.model, **common)
        if reducers:
            cfg.reducers = reducers
    if args.no_full:
        cfg.full = False
    if args.no_overlay:
        cfg.overlay = False
    if args.no_progress:
        cfg.progress = False
    if not cfg.runs:
        raise ConfigError("nothing to run: --no-full without any --reducer")
    cfg.check_values()
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed or args.coordinator:
        from jaxprune.eval.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxprune.eval.config import EvalError

    if args.list:
        from jaxprune.eval.benchmarks import list_benchmarks
        from jaxprune.reducers import registry

        print("benchmarks:", ", ".join(list_benchmarks()))
        print("reducers:  ", ", ".join(registry.names()))
        return 0
    try:
        cfg = _config(args, ap)
        if argv is None and not (args.sweep or args.benchmark):  # the console script's built-in default run
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
    default_run = not (args.sweep or args.benchmark or args.model)
    if default_run or len({r.benchmark for r in outcome.results}) == 1:
        from jaxprune.eval.report import summary_table

        print(summary_table(outcome.runs) if outcome.runs else "no run completed")
        score = (outcome.runs[0].get("score") or {}) if outcome.runs else {}
        if "chance" in score:  # synthvqa: the blind baselines the scores compare with
            print(f"\nBlind baselines on these {score['n']} questions: chance {score['chance']:.1f}%, "
                  f"majority answer per type {score.get('majority', float('nan')):.1f}%")
    else:
        print(outcome.markdown)
    if outcome.skipped or any(r.record.get("n_skipped") for r in outcome.results):
        n = len(outcome.skipped) + sum(r.record.get("n_skipped", 0) for r in outcome.results)
        print(f"\n{n} item(s) skipped: see the report", file=sys.stderr)
    print("\n" + "\n".join(f"{k}: {p}" for k, p in outcome.paths.items()))
    return 0 if outcome.results else 1


if __name__ == "__main__":
    raise SystemExit(main())
