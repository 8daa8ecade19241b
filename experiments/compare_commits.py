"""Speed before / after a change: each commit's own ``bench_forward`` and ``bench_budgets``, interleaved.

The "before" commit is checked out in a temporary git worktree and run with its own code (``PYTHONPATH`` puts
the worktree first, so its ``jaxprune`` is imported, not the installed one); the "after" side is this checkout.
Rounds alternate ``before, after, after, before, ...`` (ABBA) so a slow drift of the machine hits both sides
alike. Per side and figure the median over rounds is kept; the report gives after / before for

* ``bench_forward``: jaxprune prefill and decode ms, and the jaxprune / transformers ratios (batches 1 and 8);
* ``bench_budgets``: the full prefill, each reduced prefill, and the realized / FLOPs speedup ratio per row.

    python -m experiments.compare_commits --before 0ebe435 --rounds 2 --out engine_regression

Writes ``experiments/results/<out>.md`` and ``.json`` (the machine, the command and the raw per-round values).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench_common import RESULTS, git_rev, machine, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def _run(side: str, cwd: Path, args: list[str], out_stem: Path, log) -> dict:
    """One benchmark run of ``side`` in ``cwd``; returns its JSON."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    cmd = [sys.executable, "-m", *args, "--out", str(out_stem)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log(f"{side}: {' '.join(args)} -> rc {p.returncode} in {time.perf_counter() - t0:.0f} s")
    if p.returncode:
        raise SystemExit(f"{side} run failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    js = out_stem.with_suffix(".json") if out_stem.is_absolute() else cwd / "experiments" / "results" / (
        out_stem.name + ".json")
    return json.loads(Path(js).read_text())


def _forward_figures(d: dict) -> dict[str, float]:
    out = {}
    for r in d["runs"]:
        b = r["batch"]
        out[f"forward b{b} jax prefill ms"] = 1e3 * r["jax_prefill_s"]
        if r.get("jax_decode_s_per_tok") is not None:  # None: the decode fit was refused (experiments.timing)
            out[f"forward b{b} jax decode ms/tok"] = 1e3 * r["jax_decode_s_per_tok"]
        if r.get("torch_prefill_s"):
            out[f"forward b{b} prefill jax/torch"] = r["prefill_ratio"]
            if r.get("decode_ratio") is not None:
                out[f"forward b{b} decode jax/torch"] = r["decode_ratio"]
    return out


def _budget_figures(d: dict) -> dict[str, float]:
    out = {"budgets full prefill ms": 1e3 * d["full"]["prefill_s"]}
    for r in d["rows"]:
        if "error" in r:
            continue
        key = f"{r['reducer']}@{r['budget']}"
        out[f"budgets {key} prefill ms"] = 1e3 * r["prefill_s"]
        out[f"budgets {key} realized/FLOPs"] = r["ratio"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision of the 'before' side")
    ap.add_argument("--after", default=None, help="git revision of the 'after' side (default: this checkout as it is)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side (ABBA order)")
    ap.add_argument("--forward-args", default="experiments.bench_forward --batches 1 8 --repeats 5")
    ap.add_argument("--budgets-args", default="experiments.bench_budgets --depth 32 --repeats 3 --new-tokens 8 "
                                              "--budgets 192 64 --reducers fastv visionzip pyramiddrop consensusdrop")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed regression of the ratios (one-sided)")
    ap.add_argument("--out", default="engine_regression")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="jp_compare_"))
    sides = {"before": tmp / "before", "after": ROOT if a.after is None else tmp / "after"}
    for side, rev in (("before", a.before), ("after", a.after)):
        if rev is not None:
            subprocess.run(["git", "worktree", "add", "--detach", str(sides[side]), rev], cwd=ROOT, check=True,
                           capture_output=True)
    raw: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    try:
        order = []
        for i in range(a.rounds):
            order += ["before", "after"] if i % 2 == 0 else ["after", "before"]
        for i, side in enumerate(order):
            figs = {}
            for kind, args in (("forward", a.forward_args), ("budgets", a.budgets_args)):
                stem = tmp / f"{side}_{kind}_{i}"
                d = _run(side, sides[side], args.split(), stem, log)
                figs.update(_forward_figures(d) if kind == "forward" else _budget_figures(d))
            raw[side].append(figs)
    finally:
        for side in ("before", "after"):
            if sides[side] != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(sides[side])], cwd=ROOT,
                               capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in raw["after"][0] if all(k in r for s in raw.values() for r in s)]
    med = {s: {k: statistics.median(r[k] for r in raw[s]) for k in keys} for s in raw}
    rows, worst = [], 0.0
    for k in keys:
        b, af = med["before"][k], med["after"][k]
        rel = af / b if b else float("nan")
        # one-sided: a regression is a higher jax/torch time ratio or a lower realized/FLOPs speedup ratio
        checked = "jax/torch" in k or "realized/FLOPs" in k or " jax " in k
        if checked:
            worst = max(worst, (1 - rel) if "realized/FLOPs" in k else (rel - 1))
        rows.append([k, f"{b:.3f}", f"{af:.3f}", f"{rel:.3f}", "checked" if checked else ""])
    verdict = "PASS" if worst <= a.tolerance else "FAIL"
    cmd = "python -m experiments.compare_commits " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join([
        f"# Speed before / after ({a.before} -> {a.after or git_rev()})", "",
        f"- machine: {machine()}", f"- command: `{cmd}`",
        f"- sides run ABBA-interleaved, {a.rounds} run(s) each; medians over runs; `before` = its own code in a "
        "git worktree (its own bench scripts), `after` = this checkout",
        f"- forward: `{a.forward_args}`; budgets: `{a.budgets_args}`",
        f"- criterion (one-sided): no jaxprune time and no jax/torch ratio more than {a.tolerance:.0%} above before, "
        f"no realized/FLOPs ratio more than {a.tolerance:.0%} below it: worst "
        f"{worst:.1%} -> **{verdict}**", "",
        md_table(["figure", "before", "after", "after / before", ""], rows), ""])
    data = {"machine": machine(), "command": cmd, "before": a.before, "after": a.after or git_rev(), "rounds": a.rounds,
            "order": order, "raw": raw, "median": med, "worst": worst, "verdict": verdict}
    md_path, _ = write_results(a.out, md, data)
    log(f"wrote {md_path} ({verdict}, worst {worst:.1%})")


if __name__ == "__main__":
    assert RESULTS.is_dir()
    main()
