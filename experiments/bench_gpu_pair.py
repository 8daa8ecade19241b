"""The paired worker of :mod:`experiments.bench_gpu`: jaxprune and transformers in one process, timed in the
same ABBA rounds (the CPU stand-in's default).

On a shared CPU the two sides of a jaxprune / transformers ratio must see the same machine load: the old
stand-in ran them in separate processes minutes apart while the load swung between ~3 and ~13, and reported
ratios of 8x-21x and a transformers decode rate of -379 ms/token (a difference of two ``generate`` runs).
Here, per row, one :func:`experiments.timing.interleaved` call times

* jaxprune's prefill (``("jax", "ttft")``), transformers' TTFT (``("torch", "ttft")``) and, for a reducer row, the
  full model's jaxprune prefill (``("full", "ttft")``) -> ``ttft_vs_hf`` = median of the per-round ratios
  jax / torch, ``paired_speedup`` = median of the per-round ratios full / reduced;
* both sides' decode at every length (jaxprune's decode loop on one prefill state, transformers'
  ``generate(n)``) -> a least-squares slope per side (:func:`experiments.timing.fit_decode`), refused when not
  positive or not growing with the length.

Not for GPUs: jax and torch would share one device and one process (cuDNN / CUDA library versions can clash);
there :mod:`experiments.bench_gpu` runs :mod:`experiments.bench_gpu_jax` and :mod:`experiments.bench_gpu_torch` as
separate workers (a GPU has no shared load to pair against).

    python -m experiments.bench_gpu_pair --plan PLAN.json --out ROWS.jsonl   # normally started by bench_gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import bench_gpu_jax as J
from experiments import timing as T


def torch_key(model: str, batch: int, vis) -> str:
    return f"{model}|b{batch}|v{'full' if vis is None else vis}"


def pair_worker(settings: dict, rows: list[dict], torch_plan: dict, out: Path, deadline: float | None = None
                ) -> None:
    from experiments.bench_gpu_torch import TorchSide

    emit = J.emitter(out)
    side = J.JaxSide(settings, emit)
    hf = TorchSide(torch_plan, lambda rec: emit({"torch_" + k: v for k, v in rec.items()}))
    full: dict = {}

    def measure_row(row, rec):
        prep = side.prepare(row, rec)
        meta = prep["meta"]
        vis = None if row["reducer"] == "full" else round(meta["avg_visual_tokens"])
        tk = f"{torch_key(row['model'], row['batch'], vis)}|{row['key']}"  # one transformers record per row
        lengths = list(prep["decode"])
        tp = hf.prepare({"key": tk, "batch": row["batch"], "visual": vis}, lengths)
        key = (row["model"], row["batch"])
        fns = {("jax", "ttft"): prep["ttft"], ("torch", "ttft"): tp["ttft"]}
        if row["reducer"] != "full" and key in full:
            fns[("full", "ttft")] = full[key]
        for n in lengths:
            fns[("jax", n)], fns[("torch", n)] = prep["decode"][n], tp["decode"][n]
        res = T.interleaved(fns, settings["repeats"])
        r = {"ttft_s": res[("jax", "ttft")].median, "ttft": res[("jax", "ttft")].to_dict(),
             "first_call_s": res[("jax", "ttft")].first_s, "torch_key": tk, "paired_with_torch": True}
        ratio = res.ratio(("jax", "ttft"), ("torch", "ttft"))
        r.update(ttft_vs_hf_paired=ratio.median, ttft_vs_hf_stats=ratio.to_dict())
        if ("full", "ttft") in fns:
            sp = res.ratio(("full", "ttft"), ("jax", "ttft"))
            r.update(paired_speedup=sp.median, paired_speedup_stats=sp.to_dict(),
                     full_ttft_paired_s=res[("full", "ttft")].median)
        J.fill_decode(r, "", res, lengths, key=lambda n: ("jax", n))
        r["tokens_per_s"] = meta["batch_rows"] / r["decode_s_per_tok"] if r["decode_s_per_tok"] else None
        t = {"key": tk, "batch": row["batch"], "visual": vis, "seq": tp["seq"], "ttft_s": res[("torch", "ttft")].median,
             "ttft": res[("torch", "ttft")].to_dict(), "paired_with": row["key"]}
        J.fill_decode(t, "", res, lengths, key=lambda n: ("torch", n))
        t["tokens_per_s"] = tp["batch"] / t["decode_s_per_tok"] if t["decode_s_per_tok"] else None
        t["peak_bytes"], t["peak_kind"] = hf.peak()
        emit({"torch_record": t})
        if row["reducer"] == "full":
            full.clear()
            full[key] = prep["ttft"]
        return {**meta, **r}

    J.run_rows(side, rows, emit, measure_row, deadline)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="JSON {settings, rows, torch} written by experiments.bench_gpu")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = ap.parse_args(argv)
    plan = json.loads(Path(a.plan).read_text())
    pair_worker(plan["settings"], plan["rows"], plan["torch"], Path(a.out), plan.get("deadline"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
