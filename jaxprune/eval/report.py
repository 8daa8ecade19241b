"""Sweep reports: markdown tables like the pruning papers', a JSON dump, and a Pareto plot (PNG).

* Accuracy table: one row per method (full model, then reducer x budget), one column per benchmark with its
  headline metric and the percentage of the full model's score, and the average of those percentages
  (the papers' "Avg." column).
* Efficiency table: per benchmark and method, every number labelled (see :mod:`jaxprune.eval.efficiency`).
* Skipped items: everything ``--on-error skip`` left out, with its message.
* ``pareto.png``: accuracy (average % of full; the raw headline score if there is no full run) against TTFT and
  against visual tokens (averaged over decoder layers for in-LLM methods), one line per reducer, frontier dashed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .answers import write_json_atomic

#: Why pareto.png and the kept-token overlays are missing in a core install.
NO_PLOTS = "plots skipped (pareto.png, kept-token overlays): matplotlib is not installed; pip install 'jaxprune[plot]'"


def plotting_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None

_NAMES = {"pope": "POPE", "gqa": "GQA", "textvqa": "TextVQA", "mme": "MME", "scienceqa": "SQA-IMG",
          "mmbench": "MMB", "seed": "SEED", "vqav2": "VQAv2", "mmvet": "MM-Vet",
          "synthvqa": "SynthVQA", "msvd_qa": "MSVD-QA", "msrvtt_qa": "MSRVTT-QA", "tgif_qa": "TGIF-QA",
          "activitynet_qa": "ActivityNet-QA", "videomme": "Video-MME"}


def fmt_flops(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= s:
            return f"{x / s:.3g} {unit}"
    return f"{x:.3g}"


def fmt_bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= s:
            v = x / s
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{int(x)} B"


def _num(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _methods(runs: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["run"] for r in runs))


def _visual(e: dict) -> str:
    v, avg = e.get("visual_tokens"), e.get("visual_tokens_avg_layers")
    if v is None:
        return "n/a"
    return f"{v}" if avg is None or abs(avg - v) < 1e-9 else f"{v} (avg {avg:.1f})"


def summarise(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per method: headline per benchmark, % of full, averages (what the table and the plot show)."""
    benches = list(dict.fromkeys(r["benchmark"] for r in runs))
    full = {r["benchmark"]: r.get("headline") for r in runs if r["run"] == "full"}
    out = []
    for m in _methods(runs):
        mine = {r["benchmark"]: r for r in runs if r["run"] == m}
        cells, pcts, ttfts = {}, [], []
        for b in benches:
            r = mine.get(b)
            if r is None:
                continue
            h = r.get("headline")
            ref = full.get(b)
            pct = 100.0 * h / ref if h is not None and ref else None
            sc = r.get("score") or {}
            cells[b] = {"score": h, "pct_of_full": pct, "metric": r.get("headline_metric"),
                        "protocol": sc.get("protocol"), "scorer": sc.get("scorer")}
            if pct is not None:
                pcts.append(pct)
            t = (r.get("efficiency") or {}).get("ttft_ms")
            if t is not None:
                ttfts.append(t)
        any_run = next(iter(mine.values()))
        e = any_run.get("efficiency") or {}
        scores = [c["score"] for c in cells.values() if c["score"] is not None]
        out.append({"method": m, "reducer": any_run["reducer"], "budget": any_run["budget"], "benchmarks": cells,
                    "avg_pct_of_full": statistics.fmean(pcts) if pcts else None,
                    "avg_score": statistics.fmean(scores) if scores else None,
                    "ttft_ms": statistics.fmean(ttfts) if ttfts else None,
                    "visual_tokens": e.get("visual_tokens"), "visual_tokens_avg_layers":
                        e.get("visual_tokens_avg_layers"), "visual": _visual(e)})
    return out


def accuracy_table(runs: Sequence[dict]) -> str:
    benches = list(dict.fromkeys(r["benchmark"] for r in runs))
    metric = {r["benchmark"]: r.get("headline_metric") for r in runs}
    header = ["Method", "Visual tokens"] + [f"{_NAMES.get(b, b)} ({metric[b] or 'external'})" for b in benches] + \
        ["Avg. % of full"]
    rows = []
    for s in summarise(runs):
        cells = []
        for b in benches:
            c = s["benchmarks"].get(b)
            if c is None:
                cells.append("-")
            elif c["score"] is None:
                cells.append("n/a")
            else:
                cells.append(_num(c["score"]) + (f" ({c['pct_of_full']:.1f}%)" if c["pct_of_full"] is not None else ""))
        rows.append([s["method"], s["visual"]] + cells + [_num(s["avg_pct_of_full"]) + ("%" if s["avg_pct_of_full"]
                                                                                       is not None else "")])
    return md_table(header, rows)


def efficiency_table(runs: Sequence[dict]) -> str:
    header = ["Benchmark", "Method", "Visual tokens", "TTFT ms (batch, vision incl.)", "Decode ms/token",
              "LLM FLOPs, FastV formula", "LLM FLOPs, SwiGLU", "Total FLOPs (vision+proj+LLM)",
              "XLA prefill FLOPs", "KV cache", "Peak memory", "Compile s"]
    rows = []
    for r in runs:
        e = r.get("efficiency") or {}
        ttft = _num(e.get("ttft_ms")) + (f" (B={e['batch_rows']})" if e.get("batch_rows") else "")
        mem = fmt_bytes(e.get("peak_memory_bytes")) + {"host_rss": " (host RSS)",
                                                       "device_peak_bytes_in_use": " (device)"}.get(
            e.get("peak_memory_kind"), "")
        rows.append([_NAMES.get(r["benchmark"], r["benchmark"]), r["run"], _visual(e), ttft,
                     _num(e.get("decode_ms_per_token"), 2), fmt_flops(e.get("flops_llm_fastv_formula")),
                     fmt_flops(e.get("flops_llm_swiglu")), fmt_flops(e.get("flops_total_swiglu")),
                     fmt_flops(e.get("xla_flops_per_row")), fmt_bytes(e.get("kv_cache_bytes")), mem,
                     _num(e.get("compile_s_total"), 1)])
    return md_table(header, rows)


def summary_table(runs: Sequence[dict]) -> str:
    """Compact one-benchmark table: score, % of full, TTFT, FLOPs, KV bytes (what the default run prints)."""
    rows = []
    for r in runs:
        e = r.get("efficiency") or {}
        full = next((x.get("headline") for x in runs if x["run"] == "full" and x["benchmark"] == r["benchmark"]),
                    None)
        h = r.get("headline")
        pct = f"{100 * h / full:.1f}%" if h is not None and full else "n/a"
        rows.append([r["run"], _visual(e), _num(h), pct, _num(e.get("ttft_ms")),
                     fmt_flops(e.get("flops_llm_fastv_formula")), fmt_flops(e.get("flops_total_swiglu")),
                     fmt_bytes(e.get("kv_cache_bytes"))])
    metric = runs[0].get("headline_metric") if runs else None
    return md_table(["Method", "Visual tokens", f"Score ({metric})", "% of full", "TTFT ms",
                     "FLOPs (FastV formula, LLM)", "FLOPs (SwiGLU, total)", "KV cache / question"], rows)


NOTES = """\
Notes. Score = each benchmark's headline metric from its official-equivalent scorer (unanswered or skipped
questions count as empty answers); "% of full" = score / full model's score. Visual tokens = tokens per image
entering the LLM ("avg" = averaged over decoder layers for in-LLM cuts). TTFT = prefill of one batch
including the vision tower + first-token argmax, median after warm-up, compile excluded. FLOPs are per
question: "FastV formula" = L(4nd^2 + 2n^2d + 2ndm) over the LLM (the papers' convention), "SwiGLU" = what the
model computes (GQA, 3-matrix MLP, 2 FLOPs/MAC; total adds the vision tower and projector), "XLA" =
compiled.cost_analysis() of the jitted prefill at the padded length bucket (n/a where unavailable). KV cache =
static cache bytes of one question (prompt + max_new_tokens). Peak memory: device peak_bytes_in_use where the
backend reports it (cumulative over the process), else host peak RSS. Video QA (MSVD / MSRVTT / TGIF /
ActivityNet-QA): "proxy_accuracy_not_official" is NOT the official metric (GPT-3.5-judged accuracy and score): it
is the share of predictions containing the normalised answer; each run folder holds merge.jsonl and
judge_requests.jsonl for the official judge."""


def scorers_table(runs: Sequence[dict]) -> str:
    """Which scorer (protocol) produced each benchmark's numbers: LLaVA's official one or lmms-eval's task."""
    rows = []
    for b in dict.fromkeys(r["benchmark"] for r in runs):
        sc = next(((r.get("score") or {}) for r in runs if r["benchmark"] == b and r.get("score")), {})
        rows.append([_NAMES.get(b, b), sc.get("protocol") or "llava", sc.get("scorer") or "(see the module docstring)"])
    return md_table(["Benchmark", "Protocol", "Scorer"], rows)


def markdown(runs: Sequence[dict], skipped: Sequence[dict], meta: dict[str, Any]) -> str:
    parts = ["# jaxprune evaluation", ""]
    parts.append(f"Model `{meta.get('model_id')}` ({meta.get('dtype')}), devices: {meta.get('devices')}, "
                 f"batch size {meta.get('batch_size')}, prompt {meta.get('prompt')}.")
    parts.append("")
    if runs:
        benches = list(dict.fromkeys(r["benchmark"] for r in runs))
        if len(benches) == 1:
            parts += ["## Summary", "", summary_table(runs), ""]
        parts += ["## Accuracy", "", accuracy_table(runs), "", "## Scorers", "", scorers_table(runs), "",
                  "## Efficiency", "", efficiency_table(runs), ""]
    else:
        parts += ["No run completed.", ""]
    items = [s for s in skipped] + [{"item": f"{r['benchmark']}/{r['run']} question {x['key']}",
                                     "message": x["message"]} for r in runs for x in r.get("skipped", [])]
    if items:
        parts += ["## Skipped items", ""] + [f"- {s['item']}: {s['message']}" for s in items] + [""]
    notes = [f"- {r['benchmark']}/{r['run']}: {r['score_note']}" for r in runs if r.get("score_note")]
    notes += [f"- {r['benchmark']}/{r['run']}: submission {r['submission']}" for r in runs if r.get("submission")]
    if notes:
        parts += ["## Scoring notes", ""] + notes + [""]
    parts += [NOTES, ""]
    return "\n".join(parts)


def pareto_plot(runs: Sequence[dict], path: str | Path) -> Path | None:
    """Accuracy vs TTFT and vs visual tokens; one line per reducer (budgets), the full model as a star."""
    summ = [s for s in summarise(runs)]
    use_pct = any(s["avg_pct_of_full"] is not None for s in summ)
    key = "avg_pct_of_full" if use_pct else "avg_score"
    pts = [s for s in summ if s[key] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xkey, xlabel in ((axes[0], "ttft_ms", "TTFT ms (batch, vision tower included)"),
                             (axes[1], "visual_tokens_avg_layers", "visual tokens per image (avg over layers)")):
        groups: dict[str, list[dict]] = {}
        for s in pts:
            if s[xkey] is not None:
                groups.setdefault(s["reducer"], []).append(s)
        for name, g in groups.items():
            g = sorted(g, key=lambda s: s[xkey])
            xs, ys = [s[xkey] for s in g], [s[key] for s in g]
            if name == "full":
                ax.scatter(xs, ys, marker="*", s=160, color="black", label="full", zorder=3)
            else:
                ax.plot(xs, ys, marker="o", label=name)
                for s in g:
                    ax.annotate(str(s["budget"]), (s[xkey], s[key]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        front = _frontier([(s[xkey], s[key]) for s in pts if s[xkey] is not None])
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle="--", color="gray",
                    linewidth=0.8, label="Pareto frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("avg % of full model" if use_pct else "avg headline score")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("accuracy vs cost (up-left is better)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by a cheaper-or-equal, at-least-as-accurate point (sorted by cost)."""
    best, out = float("-inf"), []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def write_reports(out: str | Path, runs: Sequence[dict], skipped: Sequence[dict], meta: dict[str, Any],
                  overlays: Sequence[Path] = ()) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(runs, skipped, meta)
    if overlays:
        text += "\n## Kept-token overlays\n\n" + "\n".join(f"![{p.stem}]({p.relative_to(out)})"
                                                           for p in overlays) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    paths = {"markdown": out / "report.md"}
    paths["json"] = write_json_atomic(out / "report.json", {
        "meta": meta, "summary": summarise(runs), "runs": list(runs), "skipped": list(skipped),
        "overlays": [str(p) for p in overlays]})
    plot = None
    if plotting_available():  # else tables and JSON only (the sweep says so once)
        plot = pareto_plot(runs, out / "pareto.png")
    if plot is not None:
        paths["pareto"] = plot
    return paths
