"""The report of :mod:`experiments.bench_gpu`: derived figures (MFU, bandwidth, speedups, ratios to
transformers), the four targets, and ``gpu_<device>.md`` / ``.json`` (rewritten after every phase)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import timing as T
from experiments.bench_common import RESULTS, md_table

TARGETS = {"ttft_vs_hf": 0.67, "speedup_vs_flops": 0.9, "mfu_b16": 0.5, "decode_bw_b1": 0.7}
MIB = 2 ** 20


def derive(data: dict) -> None:
    """Add the derived figures to every row (in place)."""
    jenv = [v for k, v in data["env"].items() if k.startswith("jax_")]
    peak_f = jenv[0].get("peak_flops") if jenv else None
    peak_b = jenv[0].get("peak_bw") if jenv else None
    full = {(r["model"], r["batch"]): r for r in data["rows"] if r["reducer"] == "full" and "ttft_s" in r}
    for r in data["rows"]:
        if "ttft_s" not in r:
            continue
        dec = r.get("decode_s_per_tok")
        r["mfu"] = r["flops_total"] / r["ttft_s"] / peak_f if peak_f else None
        r["decode_bw_frac"] = r["decode_bytes_per_step"] / dec / peak_b if peak_b and dec else None
        f = full.get((r["model"], r["batch"]))
        if f:  # paired with the full prefill (same ABBA rounds) when the worker could, else across rows
            r["realized_speedup"] = r.get("paired_speedup") or f["ttft_s"] / r["ttft_s"]
            r["flops_speedup"] = f["flops_total"] / r["flops_total"]
            r["speedup_vs_flops"] = r["realized_speedup"] / r["flops_speedup"]
        t = data["torch"].get(r.get("torch_key", ""), {})
        if "ttft_s" in t:
            r["hf_ttft_s"], r["hf_decode_s_per_tok"] = t["ttft_s"], t.get("decode_s_per_tok")
            # paired: the median of the per-round ratios (same ABBA rounds); else a ratio of medians
            r["ttft_vs_hf"] = r.get("ttft_vs_hf_paired") or r["ttft_s"] / t["ttft_s"]
            hd = r["hf_decode_s_per_tok"]
            r["decode_vs_hf"] = dec / hd if dec and hd else None
        elif "error" in t or "skipped" in t:
            r["hf_error"] = t.get("error") or t.get("skipped")


def _f(x, scale=1.0, fmt="{:.2f}", na="n/a") -> str:
    return na if x is None else fmt.format(x * scale)


def _verdict(ok) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def targets(data: dict) -> list[list[str]]:
    rows, out = [r for r in data["rows"] if "ttft_s" in r], []
    for r in rows:
        if r["reducer"] == "full":
            v = r.get("ttft_vs_hf")
            out.append([f"TTFT <= {TARGETS['ttft_vs_hf']} x transformers at full tokens", f"{r['model']} b{r['batch']}",
                        _f(v, fmt="{:.3f}x"), _verdict(None if v is None else v <= TARGETS["ttft_vs_hf"])])
    low = {m: min(r["budget"] for r in rows if r["model"] == m and r["reducer"] != "full")
           for m in {r["model"] for r in rows if r["reducer"] != "full"}}
    for r in rows:
        if r["reducer"] != "full" and r["budget"] == low[r["model"]] and "speedup_vs_flops" in r:
            v = r["speedup_vs_flops"]
            out.append([f"realized / FLOPs speedup >= {TARGETS['speedup_vs_flops']} at {r['budget']} tokens",
                        f"{r['model']} b{r['batch']} {r['reducer']}", (f"{v:.2f} ({r['realized_speedup']:.2f}x of "
                        f"{r['flops_speedup']:.2f}x)"), _verdict(v >= TARGETS["speedup_vs_flops"])])
    for r in rows:
        if r["reducer"] == "full" and r["batch"] >= 16:
            v = r.get("mfu")
            out.append([f"prefill MFU >= {TARGETS['mfu_b16']:.0%} at batch 16", f"{r['model']} b{r['batch']}",
                        _f(v, 100, "{:.1f}%"), _verdict(None if v is None else v >= TARGETS["mfu_b16"])])
        if r["reducer"] == "full" and r["batch"] == 1:
            v = r.get("decode_bw_frac")
            out.append([f"decode >= {TARGETS['decode_bw_b1']:.0%} of HBM bandwidth at batch 1",
                        f"{r['model']} b{r['batch']}", _f(v, 100, "{:.1f}%"),
                        _verdict(None if v is None else v >= TARGETS["decode_bw_b1"])])
    return out


HEADER = ["reducer", "budget", "LLM visual (avg)", "seq", "TTFT ms", "HF TTFT ms", "TTFT / HF", "decode ms/tok",
          "HF decode ms/tok", "decode / HF", "tok/s", "KV MiB", "peak MiB (XLA plan)", "process peak MiB",
          "MFU", "decode BW",
          "FLOPs speedup", "realized", "realized / FLOPs", "compile s (prefill; decode)"]


def _stats(d, median, scale=1e3, na="n/a") -> str:
    """``median [min-max]`` ms from a timing dict, else the bare median."""
    if d and "stats" in d:
        return T.Stats(**d["stats"]).fmt(scale, 1)
    return _f(median, scale, "{:.1f}", na)


def _ratio(r: dict) -> str:
    st = r.get("ttft_vs_hf_stats")
    if st:
        return f"{st['median']:.3f} [{st['min']:.2f}-{st['max']:.2f}] (paired)"
    return _f(r.get("ttft_vs_hf"), fmt="{:.3f}")


def _speedup(r: dict) -> str:
    st = r.get("paired_speedup_stats")
    if st:
        return f"{st['median']:.2f} [{st['min']:.2f}-{st['max']:.2f}]"
    return _f(r.get("realized_speedup"))


def _decode(r: dict, na="n/a") -> str:
    fit = r.get("decode_fit")
    if fit:
        return T.fmt_fit(T.Fit(**{k: v for k, v in fit.items() if k != "per_token_s"}), 3)
    return _f(r.get("decode_s_per_tok"), 1e3, "{:.3f}", na or "n/a")


def _compile(r: dict) -> str:
    pre = r.get("prefill_compile_s")
    dec = r.get("decode_compile_s") or {}
    if pre is None:
        return "n/a"
    return f"{pre + (r.get('prefill_lower_s') or 0):.1f}" + (f"; {sum(dec.values()):.1f}" if dec else "")


def _proc(r: dict) -> str:
    if r.get("device_peak_bytes") is not None:
        return f"{r['device_peak_bytes'] / MIB:.0f}"
    return "n/a" if r.get("host_rss_peak_bytes") is None else f"{r['host_rss_peak_bytes'] / MIB:.0f} (host RSS)"


def table(data: dict, model: str, batch: int) -> str:
    out = []
    for r in data["rows"]:
        if r["model"] != model or r["batch"] != batch:
            continue
        if "ttft_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else "error: " + str(r.get("error", "?"))
            out.append([r["reducer"], r["budget"]] + [""] * (len(HEADER) - 3)
                       + [why.replace("|", "/").replace("\n", " ")[:160]])
            continue
        out.append([r["reducer"], r["budget"], f"{r['avg_visual_tokens']:.1f}", r["seq"], _stats(r.get("ttft"), r["ttft_s"]),
                    _stats(data["torch"].get(r.get("torch_key", ""), {}).get("ttft"), r.get("hf_ttft_s"),
                           na=r.get("hf_error", "n/a")[:60]), _ratio(r),
                    _decode(r, ""), _decode(data["torch"].get(r.get("torch_key", ""), {}), ""),
                    _f(r.get("decode_vs_hf"), fmt="{:.3f}"), _f(r.get("tokens_per_s"), fmt="{:.1f}"),
                    _f(r["kv_bytes"], 1 / MIB, "{:.1f}"), _f(r.get("plan_peak_bytes"), 1 / MIB, "{:.0f}"), _proc(r),
                    _f(r.get("mfu"), 100, "{:.1f}%"), _f(r.get("decode_bw_frac"), 100, "{:.1f}%"),
                    _f(r.get("flops_speedup")), _speedup(r), _f(r.get("speedup_vs_flops"))
                    + (" (above the FLOPs limit)" if (r.get("speedup_vs_flops") or 0) > 1.05 else ""),
                    _compile(r)])
    return md_table(HEADER, out)


def markdown(a, data: dict) -> str:
    jenv = next((v for k, v in data["env"].items() if k.startswith("jax_")), {})
    tenv = next((v for k, v in data["env"].items() if k.startswith("torch_")), {})
    cpu = jenv.get("platform", "cpu") == "cpu"
    title = ("CPU, reduced size: NOT the GPU target run" if cpu and a.size != "tiny" else
             "tiny smoke config" if a.size == "tiny" else jenv.get("device_kind", "?"))
    s = data["settings"]
    paired = s.get("pairing") == "process"
    host = data.get("host")
    lines = [f"# LLaVA-1.5 / NeXT speed: jaxprune vs transformers ({title})", "",
             *(T.header_lines(host, data.get("load"), data.get("quiet")) if host else [f"- machine: {data['machine']}"]),
             (f"- jax device: {jenv.get('platform', '?')}:{jenv.get('device_kind', '?')} (jax {jenv.get('jax', '?')}); "
             f"peaks: bf16 {_f(jenv.get('peak_flops'), 1e-12, '{:.0f} TFLOP/s')}, HBM {_f(jenv.get('peak_bw'), 1e-12, '{:.2f} TB/s')}"),
             f"- transformers side: {tenv.get('device_name', 'n/a')} torch {tenv.get('torch', '?')}, transformers "
             f"{tenv.get('transformers', '?')}, attn sdpa, {tenv.get('threads', '?')} threads" if tenv else
             "- transformers side: not run",
             f"- git {data['git']}; command: `{data['command']}`",
             (f"- size {s['size']}, dtype {s['dtype']}, attention {jenv.get('attention', '?')}; random weights; prompt "
              "35 text + image + 40 text tokens"),
             ("- method (`experiments/timing.py`): one warm-up call per program (compile timed apart: lower + compile, "
              f"last column), then {s['repeats']} ABBA rounds; times = median [min-max] ms; "
              + ("**paired**: jaxprune and transformers in one process per model, in the same rounds; TTFT / HF = "
                 "median [min-max] of the per-round ratios" if paired else
                 "jaxprune and transformers in separate worker processes one after the other (a GPU has no shared "
                 "load); TTFT / HF = ratio of medians")
              + "; realized speedup = median [min-max] of the per-round ratios with the full prefill in the same "
              "rounds; decode = slope of a least-squares fit of time vs tokens at lengths "
              f"{T.decode_lengths(s['new_tokens'], s.get('decode_points', 3))} (ms/token, + intercept ms, rms ms; "
              f"rows: {s.get('decode', 'all')}), refused when not positive / not growing"),
             ("- figures as defined in `experiments/bench_gpu.py` (docstring): TTFT incl. vision tower; KV = real cache "
              "bytes; peak = XLA plan of the prefill program (weights + inputs + KV + temporaries); process peak = the "
              "device allocator's lifetime peak (`memory_stats`), or the worker's peak RSS on CPU (both monotone over a "
              "worker's rows); MFU / decode BW against the device's bf16 / HBM peaks (n/a: unknown device, e.g. CPU); "
              "HF pruned rows = whole tower + LLM at text + the LLM visual count (layer-averaged for in-LLM methods)")]
    if cpu and a.size != "tiny":
        lines += [("- **CPU stand-in, not the target run**: reduced widths/depths (json `configs`), fp32, on a shared "
                   "2-core machine (load above). The targets need `python -m experiments.bench_gpu --model both "
                   "--batch 1 16` on a GPU (writes `gpu_<device>.md`).")]
    lines += [f"\n{n}" for n in data.get("notes") or []]
    lines += ["", "## Targets", "", md_table(["target", "row", "value", "verdict"], targets(data)), ""]
    for m in dict.fromkeys(r["model"] for r in data["rows"]):
        for b in data["batches"]:
            lines += [f"## {m}, batch {b}", "", table(data, m, b), ""]
    bad = [w for w in data["workers"] if w["rc"] != 0]
    if bad:
        lines += ["## Worker failures", ""] + [f"- {w['worker']}: exit {w['rc']}: `{w['stderr_tail'][-300:]}`"
                                                for w in bad] + [""]
    lines += [f"Phase seconds: {json.dumps({k: round(v) for k, v in data['seconds'].items()})}", ""]
    return "\n".join(lines)


def out_base(a, data: dict) -> Path | None:
    if a.out:
        p = Path(a.out)
        p = p.with_suffix("") if p.suffix in (".md", ".json") else p
        return RESULTS / p if len(p.parts) == 1 and not p.is_absolute() else p
    jenv = next((v for k, v in data["env"].items() if k.startswith("jax_")), {})
    name = f"gpu_{jenv.get('slug', 'unknown')}" + ("" if a.size == "full" else f"_{a.size}")
    if getattr(a, "out_dir", None):  # e.g. $OUT on the device machine: the report goes beside the row files
        return Path(a.out_dir) / name
    if a.size == "tiny":
        return None
    return RESULTS / name


def write(a, data: dict, final: bool = True) -> Path | None:
    """Derive, render and write the report (after every phase: a killed run keeps its last report); prints the
    whole report when ``final``, else the targets so far."""
    derive(data)
    md = markdown(a, data)
    base = out_base(a, data)
    if base is not None:
        base.parent.mkdir(parents=True, exist_ok=True)
        (base.parent / (base.name + ".md")).write_text(md)
        (base.parent / (base.name + ".json")).write_text(json.dumps(data, indent=1, default=str))
        data["files"] = [str(base) + ".md", str(base) + ".json"]
    if final:
        print(md, flush=True)
    else:
        print("bench_gpu: targets so far\n" + md_table(["target", "row", "value", "verdict"], targets(data)), flush=True)
    return base
