"""The report of :mod:`experiments.bench_gpu`: derived figures (MFU, bandwidth, speedups, ratios to
transformers), the four targets, and ``gpu_<device>.md`` / ``.json`` (rewritten after every phase)."""

from __future__ import annotations

import json
from pathlib import Path

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
        r["mfu"] = r["flops_total"] / r["ttft_s"] / peak_f if peak_f else None
        r["decode_bw_frac"] = (r["decode_bytes_per_step"] / r["decode_s_per_tok"] / peak_b
                               if peak_b and r["decode_s_per_tok"] > 0 else None)
        f = full.get((r["model"], r["batch"]))
        if f:  # paired with the full prefill when the worker could (robust to load drift), else across rows
            r["realized_speedup"] = r.get("paired_speedup") or f["ttft_s"] / r["ttft_s"]
            r["flops_speedup"] = f["flops_total"] / r["flops_total"]
            r["speedup_vs_flops"] = r["realized_speedup"] / r["flops_speedup"]
        t = data["torch"].get(r.get("torch_key", ""), {})
        if "ttft_s" in t:
            r["hf_ttft_s"], r["hf_decode_s_per_tok"] = t["ttft_s"], t["decode_s_per_tok"]
            r["ttft_vs_hf"] = r["ttft_s"] / t["ttft_s"]
            r["decode_vs_hf"] = r["decode_s_per_tok"] / t["decode_s_per_tok"] if t["decode_s_per_tok"] > 0 else None
        elif "error" in t:
            r["hf_error"] = t["error"]


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
          "FLOPs speedup", "realized", "realized / FLOPs"]


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
            out.append([r["reducer"], r["budget"]] + [""] * (len(HEADER) - 3)
                       + ["error: " + str(r.get("error", "?")).replace("|", "/").replace("\n", " ")[:160]])
            continue
        out.append([r["reducer"], r["budget"], f"{r['avg_visual_tokens']:.1f}", r["seq"], _f(r["ttft_s"], 1e3),
                    _f(r.get("hf_ttft_s"), 1e3, na=r.get("hf_error", "n/a")[:60]), _f(r.get("ttft_vs_hf"), fmt="{:.3f}"),
                    _f(r["decode_s_per_tok"], 1e3, "{:.3f}"), _f(r.get("hf_decode_s_per_tok"), 1e3, "{:.3f}"),
                    _f(r.get("decode_vs_hf"), fmt="{:.3f}"), _f(r["tokens_per_s"], fmt="{:.1f}"),
                    _f(r["kv_bytes"], 1 / MIB, "{:.1f}"), _f(r.get("plan_peak_bytes"), 1 / MIB, "{:.0f}"), _proc(r),
                    _f(r.get("mfu"), 100, "{:.1f}%"), _f(r.get("decode_bw_frac"), 100, "{:.1f}%"),
                    _f(r.get("flops_speedup")), _f(r.get("realized_speedup")), _f(r.get("speedup_vs_flops"))])
    return md_table(HEADER, out)


def markdown(a, data: dict) -> str:
    jenv = next((v for k, v in data["env"].items() if k.startswith("jax_")), {})
    tenv = next((v for k, v in data["env"].items() if k.startswith("torch_")), {})
    cpu = jenv.get("platform", "cpu") == "cpu"
    title = ("CPU, reduced size: NOT the GPU target run" if cpu and a.size != "tiny" else
             "tiny smoke config" if a.size == "tiny" else jenv.get("device_kind", "?"))
    s = data["settings"]
    lines = [f"# LLaVA-1.5 / NeXT speed: jaxprune vs transformers ({title})", "",
             f"- machine: {data['machine']}",
             (f"- jax device: {jenv.get('platform', '?')}:{jenv.get('device_kind', '?')} (jax {jenv.get('jax', '?')}); "
             f"peaks: bf16 {_f(jenv.get('peak_flops'), 1e-12, '{:.0f} TFLOP/s')}, HBM {_f(jenv.get('peak_bw'), 1e-12, '{:.2f} TB/s')}"),
             f"- transformers side: {tenv.get('device_name', 'n/a')} torch {tenv.get('torch', '?')}, transformers "
             f"{tenv.get('transformers', '?')}, attn sdpa, {tenv.get('threads', '?')} threads" if tenv else
             "- transformers side: not run",
             f"- git {data['git']}; command: `{data['command']}`",
             (f"- size {s['size']}, dtype {s['dtype']}, attention {jenv.get('attention', '?')}, median of {s['repeats']}, "
             f"decode over {s['new_tokens']} tokens; random weights; prompt 35 text + image + 40 text tokens"),
             ("- figures as defined in `experiments/bench_gpu.py` (docstring): TTFT incl. vision tower; decode = per "
             "generated token (all rows); KV = real cache bytes; peak = XLA plan of the prefill program "
             "(weights + inputs + KV + temporaries); process peak = the device allocator's lifetime peak "
             "(`memory_stats`), or the worker's peak RSS on CPU (both monotone over a worker's rows); MFU / decode BW against the device's bf16 / HBM peaks (n/a: "
             "unknown device, e.g. CPU); HF pruned rows = whole tower + LLM at text + the LLM visual count "
             "(layer-averaged for in-LLM methods)")]
    if cpu and a.size != "tiny":
        lines += [("- **CPU stand-in, not the target run**: reduced widths/depths (json `configs`), fp32, batch 1, on a "
                   "shared 2-core machine whose load swung between ~3 and ~13 during the run. Reliable here: KV bytes, "
                   "XLA-plan memory, FLOPs, sequence lengths, and the *paired* realized speedups (each reducer's "
                   "prefill interleaved with the full model's). Not reliable: absolute times and the jaxprune / "
                   "transformers ratios (the two sides run minutes apart, in different processes, under different "
                   "load). The targets need `python -m experiments.bench_gpu --model both --batch 1 16` on a GPU "
                   "(writes `gpu_<device>.md`).")]
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
    if a.size == "tiny":
        return None
    jenv = next((v for k, v in data["env"].items() if k.startswith("jax_")), {})
    return RESULTS / (f"gpu_{jenv.get('slug', 'unknown')}" + ("" if a.size == "full" else f"_{a.size}"))


def write(a, data: dict) -> Path | None:
    derive(data)
    md = markdown(a, data)
    base = out_base(a, data)
    if base is not None:
        base.parent.mkdir(parents=True, exist_ok=True)
        (base.parent / (base.name + ".md")).write_text(md)
        (base.parent / (base.name + ".json")).write_text(json.dumps(data, indent=1, default=str))
        data["files"] = [str(base) + ".md", str(base) + ".json"]
    print(md, flush=True)
    return base
