"""Accuracy vs budget of every reducer on the synthetic VQA test set, several data seeds, through the harness.

``python -m experiments.synthvqa.sweep`` -> ``experiments/results/synthvqa.md`` + ``.json``.

For each data seed the test split (``--images`` images, up to 4 questions each) is written as a benchmark
folder and run with :func:`jaxprune.eval.sweep.run_sweep` (the same prompts, preprocessing, greedy
decoding and scorer as ``jaxprune-eval``): the full model, then every reducer of
:func:`jaxprune.reducers.registry.names` for this benchmark (the synthvqa-only ``oracle``, the upper bound,
included) at each budget. Budgets are for the model's 144 visual tokens:
48/32/16/8 = LLaVA-1.5's 192/128/64/32 of 576. For multi-cut in-LLM methods the budget is the average
over the decoder's layers; averages a 4-layer decoder cannot reach are reported as "n/a" with the reason,
and their ``*_final`` registry variants (``pyramiddrop_final``, ``adsc_final``: ``budget`` = tokens left after
the last cut, same cut layers) give those methods a row at every budget.
The table gives mean +- sample standard deviation over seeds (accuracy in %), and the per-type accuracy
of every run is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from jaxprune.eval.config import BenchmarkSpec, ReducerSpec, SweepConfig
from jaxprune.eval.runner import Context
from jaxprune.eval.sweep import load_model, run_sweep
from jaxprune.eval.synthvqa.export import write_benchmark
from jaxprune.reducers import registry

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUDGETS = (48, 32, 16, 8)
LLAVA_EQUIV = {48: 192, 32: 128, 16: 64, 8: 32}


#: two-sided 95 % Student-t quantiles by degrees of freedom (seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci95(xs: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean of ``xs`` (Student t over the seeds; nan for one)."""
    if len(xs) < 2:
        return float("nan")
    return T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {ci95(xs):.1f}"


def run(model: str, seeds: list[int], n_images: int, budgets: list[int], reducers: list[str], out: Path,
        batch_size: int = 64, style: str = "grid", command: str = "python -m experiments.synthvqa.sweep") -> dict:
    m, tok, model_id, model_dir = load_model(model)
    ctx = Context.create(m, tok, model_id, model_dir=model_dir)
    rows: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="synthvqa-sweep-") as d:
        for seed in seeds:
            data = write_benchmark(Path(d) / f"data{seed}", "test", seed, n_images=n_images, style=style)
            cfg = SweepConfig(model=model, benchmarks=[BenchmarkSpec("synthvqa", str(data))],
                              reducers=[ReducerSpec(r, b) for r in reducers for b in budgets], full=True,
                              out=str(Path(d) / f"out{seed}"), batch_size=batch_size, max_new_tokens=4,
                              on_error="skip", overlay=False, progress=False, timing_reps=1)
            outcome = run_sweep(cfg, context=ctx)
            for r in outcome.runs:
                rows.append({"seed": seed, "reducer": r["reducer"], "budget": r["budget"],
                             "n_questions": r["n_questions"], "score": r["score"]})
            skipped += [dict(s, seed=seed) for s in outcome.skipped]
            print(f"seed {seed}: {len(outcome.runs)} runs, {len(outcome.skipped)} skipped", flush=True)
    result = {"model": model, "model_id": model_id, "seeds": seeds, "images_per_seed": n_images, "style": style,
              "command": command, "budgets": budgets, "rows": rows, "skipped": skipped}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return result


def _acc(rows: list[dict], reducer: str, budget: int | None) -> list[float]:
    return [r["score"]["accuracy"] for r in rows if r["reducer"] == reducer and r["budget"] == budget]


def markdown(res: dict) -> str:
    rows, budgets = res["rows"], res["budgets"]
    full = _acc(rows, "full", None)
    nq = sorted({r["n_questions"] for r in rows})
    chance = next((r["score"].get("chance") for r in rows if r["reducer"] == "full"), None)
    lines = [
        "# Synthetic VQA: accuracy vs visual-token budget",
        "",
        f"Model `{res['model_id']}` (144 visual tokens). Test split, scene style {res.get('style', 'grid')}, data "
        f"seeds {res['seeds']}, {res['images_per_seed']} images per seed ({', '.join(map(str, nq))} questions). "
        f"Command: `{res.get('command', 'python -m experiments.synthvqa.sweep')}`. Accuracy in %, mean over the "
        "seeds ± the half-width of its 95 % confidence interval (Student t over the seed means).",
        "",
        f"Full model: **{_fmt(full)}**" + (f" (chance {chance:.1f})" if isinstance(chance, (int, float)) else ""),
        "",
        "| reducer | " + " | ".join(f"{b} (= {LLAVA_EQUIV.get(b, '?')}/576)" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    names = sorted({r["reducer"] for r in rows if r["reducer"] != "full"})
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(_acc(rows, n, b)) for b in budgets) + " |")
    lines += ["", "Budgets: visual tokens reaching the LLM for pre-LLM methods; tokens kept after layer 2 for FastV "
              "/ DART; the average over the 4 decoder layers for pyramiddrop / adsc / adsc_grid / visiondrop; "
              "tokens left after the last cut for `*_final` (the same cut layers; see "
              "`jaxprune.reducers.registry`)."]
    small = min(budgets)
    means = {n: statistics.mean(a) for n in names if (a := _acc(rows, n, small))}
    if "random" in means and len(means) > 1:
        best = max((n for n in means if n != "random"), key=means.get)
        ab, ar = _acc(rows, best, small), _acc(rows, "random", small)
        sd = (statistics.stdev(ab) ** 2 / len(ab) + statistics.stdev(ar) ** 2 / len(ar)) ** 0.5 if min(
            len(ab), len(ar)) > 1 else float("nan")
        lines += ["", f"At the smallest budget ({small} tokens): best reducer **{best}** {_fmt(ab)} vs **random** "
                  f"{_fmt(ar)}: margin {means[best] - means['random']:+.1f} points "
                  f"({(means[best] - means['random']) / sd:.1f} standard errors of the difference of seed means)."]
    types = list(next((r["score"].get("per_type", {}) for r in rows if r["reducer"] == "full"), {}))
    for b in sorted({max(budgets), min(budgets)}, reverse=True):
        lines += ["", f"Per question type at {b} tokens (mean over seeds; full model first):", "",
                  "| reducer | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for n in ["full", *names]:
            sel = [r for r in rows if r["reducer"] == n and r["budget"] == (None if n == "full" else b)]
            if sel:
                lines.append(f"| {n} | " + " | ".join(
                    f"{statistics.mean(r['score']['per_type'].get(t, float('nan')) for r in sel):.0f}" for t in types)
                    + " |")
    if res.get("reading"):  # written after looking at this run's figures (kept in the JSON with them)
        lines += ["", "## Reading", "", *res["reading"]]
    lines += ["", "AdaFV (adafv) is run as the official code: a token chosen by both signals is fed to the LLM "
              "twice (`AdaFV(dedupe=False)`), which the synthetic model's count readout is sensitive to."]
    if res["skipped"]:
        lines += ["", "Not run (budget unreachable or error):", ""]
        seen = set()
        for s in res["skipped"]:
            if s["item"] not in seen:
                seen.add(s["item"])
                lines.append(f"- {s['item']}: {s['message'][:200]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthvqa", help="built-in model name or model directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=60, help="test images per seed (up to 4 questions each)")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    ap.add_argument("--reducers", nargs="+", default=registry.names("llava", benchmark="synthvqa"))
    ap.add_argument("--style", default=None, help="scene style of the test images (default: the model's training "
                    "style, from its synthvqa.json; grid without one)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "synthvqa")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json (no runs)")
    a = ap.parse_args(argv)
    if a.render:
        a.out.with_suffix(".md").write_text(markdown(json.loads(a.out.with_suffix(".json").read_text())))
        return
    from jaxprune.eval.builtin import model_style

    command = " ".join(["python -m experiments.synthvqa.sweep", *(argv if argv is not None else sys.argv[1:])])
    run(a.model, a.seeds, a.images, a.budgets, a.reducers, a.out, a.batch_size, a.style or model_style(a.model),
        command)


if __name__ == "__main__":
    main()
