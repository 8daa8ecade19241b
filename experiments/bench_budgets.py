"""Prefill time, decode ms/token, KV bytes and analytic FLOPs at 576 / 192 / 128 / 64 visual tokens.

Rows: the full model (576 tokens) and every registered reducer (:func:`jaxprune.reducers.registry.names`,
pre-LLM and in-LLM) at each budget, with the ``bench_forward`` prompt (35-token prefix, one image,
40-token question), fp32, random weights, on

* ``--depth 32`` (default): :func:`bench_common.bench_config` ``(num_layers=32)``, CLIP 6 x 256 + Llama
  **32** x 512 (the 8-layer bench config's layers, LLaVA-1.5's depth).
  The in-LLM multi-cut methods define their budgets as the average visual-token count over the decoder
  layers with cuts at fixed fractions of a 32-layer decoder (PyramidDrop / ADSC after layers 2 / 8 / 16,
  VisionDrop after 8 / 16 / 24). On 8 layers those schedules collapse to cuts after layers 1 / 2 / 4 and
  64 is unreachable (the first layer alone averages 576 / 8 = 72 tokens), so the budget table is measured
  at LLaVA-1.5's depth (narrower than 7B to stay affordable on a CPU);
* ``--depth 8``: :func:`bench_common.bench_config`, CLIP 6 x 256 + Llama 8 x 512 (the config of
  ``bench_forward`` / ``bench_reducers``; 64 is then unreachable for the multi-cut methods and reported as
  an error row).

Columns:

* prefill ms = jitted prefill to the first token's logits (TTFT, vision tower included; the prefill program of
  ``model.plan(..., reducer=spec)`` as ``Llava.generate`` runs it), median of ``--repeats`` runs;
* decode ms/token = the slope of a least-squares fit of the decode loop's time (``jaxprune.engine.decode`` on
  one prefill state whose KV caches hold N+1 new tokens, EOS disabled) at several lengths up to N+1
  (:func:`experiments.timing.decode_lengths`), with its intercept and residual in the JSON; a fit whose slope
  is not positive or whose medians do not grow with the length is refused (no figure), never reported;
* KV bytes = ``DecodeState.kv_bytes`` of the real prefill, asserted equal to
  :func:`jaxprune.flops.kv_cache_bytes` (a mismatch fails the run after the results are written);
* FLOPs = :func:`jaxprune.flops.prefill_cost` ``.total`` (vision + projector + LLM with SwiGLU and GQA,
  LM head on the last token, plus the selection work of in-LLM cuts that score with the next layer's
  attention, ``llm_cuts``) at the sequence length the model really runs (the prompt padded to the
  model's 32-token bucket), plus, for reducers with ``shallow_layers > 0`` (ConsensusDrop
  source="shallow"), the shallow prefill on the full sequence, which ``prefill_cost`` does not count;
  the FastV-formula LLM count (``llm_fastv_formula``) is listed too, labelled;
* average visual tokens over the decoder layers (``PrefillCost.average_visual_tokens``);
* realized speedup = median of the per-round ratios t_full / t over ``--repeats`` ABBA rounds in which the
  full model's prefill is timed next to the row's (:func:`experiments.timing.interleaved`), so that both sides
  of the ratio see the same machine load (on a shared machine, a full-model time taken minutes earlier moved
  the ratios by +-15%); FLOPs speedup = FLOPs_full / FLOPs, ratio = realized / FLOPs speedup, pass when
  ratio >= 0.85. Warm-up calls (compile included) are never timed; each prefill program's lower + compile time
  is reported apart.

    python -m experiments.bench_budgets [--depth 32|8] [--budgets 192 128 64] [--batch 1] [--repeats 5]
                                        [--out STEM|PATH]

Writes ``experiments/results/budgets_cpu.md``, ``.json`` and ``.png`` (prefill ms vs average visual
tokens; with ``--out X`` the three files are ``X.md``, ``X.json``, ``X.png``). ``--out`` takes a stem
(under ``experiments/results``) or a path; ``--tiny`` writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import traceback

import jax

from experiments import bench_reducers as br
from experiments import timing as T
from experiments.bench_common import bench_config, describe_config, git_rev, jax_device, md_table
from experiments.bench_forward import PREFIX, QUESTION, make_inputs
from jaxprune import engine, flops
from jaxprune.reducers import registry
from jaxprune.reducers.compose import as_tuple

TARGET_RATIO = 0.85


def shallow_flops(cfg, spec, seq: int, batch: int) -> float:
    """FLOPs of the shallow prefill(s) ``jaxprune.engine.encode`` runs for projector reducers with
    ``shallow_layers``: ``K-1`` full decoder layers on the ``seq``-token sequence, then layer K-1's norm + q/k/v
    projections and the score rows of its ``query_rows`` last tokens (``jaxprune.engine.vision.text_to_image``)."""
    c = cfg.text
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    total = 0.0
    for r in as_tuple(spec):
        k = getattr(r, "shallow_layers", 0) if r.stage == "projector" else 0
        if k:
            rows = getattr(r, "query_rows", 32)
            total += ((k - 1) * flops.llm_layer(cfg, seq) + 2 * seq * c.hidden_size * (q + 2 * kv)
                      + 2 * rows * seq * q)
    return batch * total


def release_programs(model) -> None:
    """Drop the compiled prefill and decode programs of the rows done so far (``model.programs``; the pairing
    baseline, the full model's prefill, runs from programs of its own and stays). A full sweep compiles ~100
    programs of a 32-layer decoder; kept alive they exhausted the JIT's memory mappings on a 24 GiB machine
    ("LLVM compilation error: Cannot allocate memory") after ~40 rows."""
    model.programs.clear_cache()


def bench_row(model, spec, ids, mask, px, new_tokens: int, repeats: int, baseline=None) -> dict:
    """One row. ``baseline`` (the full model's prefill, a blocking callable): time the prefill in ABBA rounds
    with it and report ``speedup`` = median of the per-round ratios."""
    cfg = model.cfg
    run, meta = br.prefill_runner(model, spec, ids, mask, px)
    ipr, text = meta["imgs_per_row"], meta["text_tokens"]
    p = meta["plan"]
    B, T_ = p.batch_shape
    n = new_tokens + 1
    comp = T.compile_seconds(model.programs.prefill, model.params, p.arrays, static=p.static, max_new_tokens=n)
    state = run(n)
    lengths = T.decode_lengths(new_tokens)
    fns = {"prefill": lambda: jax.block_until_ready(run(n).first_logits)}
    if baseline is not None:
        fns["full"] = baseline
    fns.update({k: (lambda k=k: jax.block_until_ready(engine.decode(model, state, k, eos_ids=(), pad_id=0)))
                for k in lengths})
    res = T.interleaved(fns, repeats)
    fit = T.fit_decode({k: res[k].samples for k in lengths})
    paired = {}
    if baseline is not None:
        sp = res.ratio("full", "prefill")
        paired = {"full_prefill_s_paired": res["full"].median, "speedup": sp.median, "speedup_stats": sp.to_dict(),
                  "prefill_times_s": res["prefill"].samples, "full_prefill_times_s": res["full"].samples}
    cost = flops.prefill_cost(cfg, spec, text_tokens=text, images=ipr, batch=B)
    kv_analytic = flops.kv_cache_bytes(cfg, cost, batch=B, new_tokens=n, itemsize=model.dtype.itemsize)
    extra = 0.0 if spec is None else shallow_flops(cfg, spec, T_, B)
    return {"stages": "" if spec is None else br.describe(spec), "seq": T_,
            "text_tokens": text,
            "avg_visual_tokens": cost.average_visual_tokens, "segments": cost.segments,
            "visual_tokens": cost.visual_tokens, "prefill_s": res["prefill"].median,
            "prefill_stats": res["prefill"].stats.to_dict(), "prefill_compile_s": comp["compile_s"],
            "prefill_first_s": res["prefill"].first_s, "decode_s_per_tok": fit.per_token_s,
            "decode_fit": fit.to_dict(), "kv_bytes": int(state.kv_bytes), "kv_bytes_analytic": int(kv_analytic),
            "kv_agree": int(state.kv_bytes) == int(kv_analytic), "flops_vision": cost.vision,
            "flops_projector": cost.projector, "flops_llm": cost.llm_swiglu, "flops_llm_cuts": cost.llm_cuts,
            "flops_shallow": extra, "flops_total": cost.total + extra,
            "flops_llm_fastv_formula": cost.llm_fastv_formula, **paired}


def plot(rows: list[dict], full: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(full["prefill_s"] * 1e3, color="k", ls="--", lw=1, label=f"full model ({full['budget']} tokens)")
    ax.plot([full["avg_visual_tokens"]], [full["prefill_s"] * 1e3], "k*", ms=10)
    markers = "os^vD<>pPhX*d"
    names = list(dict.fromkeys(r["reducer"] for r in rows if "error" not in r))
    for i, name in enumerate(names):
        pts = sorted((r["avg_visual_tokens"], r["prefill_s"] * 1e3) for r in rows
                     if r["reducer"] == name and "error" not in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], ls="-", lw=0.8,
                color=plt.cm.tab20(i % 20), label=name)
    ax.set_xlabel("average visual tokens over the decoder layers")
    ax.set_ylabel("prefill ms (TTFT, vision included)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64],
                    help="visual-token budgets as quoted for LLaVA-1.5 (576 tokens); --tiny scales them")
    ap.add_argument("--depth", type=int, choices=(8, 32), default=32,
                    help="decoder layers of the bench config (Llama N x 512): 32, LLaVA-1.5's depth (default), or 8, the "
                         "bench_forward / bench_reducers config; ignored with --tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 1 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="N for the decode rate (default 32; 2 with --tiny)")
    ap.add_argument("--reducers", nargs="+", default=None, help="subset of registered names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--note", action="append", default=[], help="free-text note for the results file (repeatable)")
    ap.add_argument("--out", default=None, help="results stem or path (default budgets_cpu; none with --tiny)")
    T.add_cli(ap)
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished rows of OUT.json (written after every row) and run only the others")
    a = ap.parse_args(argv)
    cfg = br.tiny_config() if a.tiny else bench_config(num_layers=a.depth)
    repeats = a.repeats or (1 if a.tiny else 5)
    new_tokens = a.new_tokens or (2 if a.tiny else 32)
    budgets = br.scale_budgets(cfg, a.budgets)
    names = a.reducers or registry.names(cfg.model_type)
    base = br.out_base(a.out, "budgets_cpu", a.tiny)
    done: dict = {}
    prior = None
    if a.resume:
        if base is None or not br.with_suffix(base, ".json").is_file():
            raise SystemExit(f"--resume: no results file {None if base is None else br.with_suffix(base, '.json')}")
        prior = json.loads(br.with_suffix(base, ".json").read_text())
        if prior.get("config") != cfg.to_hf_dict() or prior.get("repeats") != repeats or prior.get(
                "new_tokens") != new_tokens or prior.get("batch") != a.batch:
            raise SystemExit("--resume: the results file was measured with another config / repeats / new tokens /"
                             " batch; run without --resume")
        done = {(r["reducer"], r["budget"]): r for r in prior["rows"] if "error" not in r}
    model = br.load_model(cfg)
    ids, mask, px = make_inputs(cfg, a.batch)
    quiet = T.quiet_from_cli(a)
    monitor = T.LoadMonitor().__enter__()
    full = prior["full"] if prior else {"reducer": "full", "budget": cfg.tokens_per_image,
                                        **bench_row(model, None, ids, mask, px, new_tokens, repeats)}
    run_full, _ = br.prefill_runner(model, None, ids, mask, px, programs=engine.Programs(model.graphdef))
    n_full = new_tokens + 1
    baseline = lambda: jax.block_until_ready(run_full(n_full).first_logits)  # noqa: E731
    data = {"device": jax_device(), "quiet": quiet, "git": git_rev(), "command": br.command(
        "experiments.bench_budgets", argv), "config": cfg.to_hf_dict(), "batch": a.batch, "prefix": PREFIX,
        "question": QUESTION, "repeats": repeats, "new_tokens": new_tokens, "budgets": budgets,
        "target_ratio": TARGET_RATIO, "full": full, "rows": []}

    def fmt(r: dict) -> list:
        mib = r["kv_bytes"] / 2 ** 20
        kv = f"{mib:.3f}" + ("" if r["kv_agree"] else f" (analytic {r['kv_bytes_analytic'] / 2 ** 20:.3f}!)")
        paired = f"{r['full_prefill_s_paired'] * 1e3:.2f}" if "full_prefill_s_paired" in r else ""
        pre = T.Stats(**r["prefill_stats"]).fmt(digits=2) if "prefill_stats" in r else f"{r['prefill_s'] * 1e3:.2f}"
        fit = r.get("decode_fit")
        dec = (T.fmt_fit(T.Fit(**{k: v for k, v in fit.items() if k != "per_token_s"}), 3) if fit else
               T.fmt_ms(r["decode_s_per_tok"], 3))
        cells = [r["reducer"], r["budget"], r["stages"] or "-", f"{r['avg_visual_tokens']:.1f}",
                 pre, paired, dec, kv,
                 "yes" if r["kv_agree"] else "NO", f"{r['flops_total'] / 1e9:.3f}",
                 f"{r['flops_llm_fastv_formula'] / 1e9:.3f}"]
        if r is full:
            return cells + ["1.00", "1.00", "", ""]
        sp = (f"{r['speedup']:.2f} [{r['speedup_stats']['min']:.2f}-{r['speedup_stats']['max']:.2f}]"
              if "speedup_stats" in r else f"{r['speedup']:.2f}")
        return cells + [sp, f"{r['flops_speedup']:.2f}", f"{r['ratio']:.2f}",
                        "pass" if r["pass"] else "FAIL"]

    table = [fmt(full)]
    print(table[-1], flush=True)
    if prior:
        data["resumed_from"] = {"git": prior.get("git"), "command": prior.get("command"), "rows": len(done)}
    for name in names:
        for budget in budgets:
            if (name, budget) in done:
                data["rows"].append(done[(name, budget)])
                table.append(fmt(done[(name, budget)]))
                continue
            row = {"reducer": name, "budget": budget}
            try:
                spec = registry.make(name, budget, cfg)
                row["spec"] = repr(spec)
                row.update(bench_row(model, spec, ids, mask, px, new_tokens, repeats, baseline))
                row["flops_speedup"] = full["flops_total"] / row["flops_total"]
                row["ratio"] = row["speedup"] / row["flops_speedup"]
                row["pass"] = row["ratio"] >= TARGET_RATIO
                table.append(fmt(row))
            except Exception as e:  # noqa: BLE001 - a reducer that cannot run at this budget is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                table.append([name, budget] + [""] * 12 + ["error: " + row["error"].replace("|", "/")])
            data["rows"].append(row)
            print(table[-1], flush=True)
            release_programs(model)
            if base is not None:  # every finished row is on disk: a crash loses at most the row it was in
                base.parent.mkdir(parents=True, exist_ok=True)
                br.with_suffix(base, ".json").write_text(json.dumps(dict(data, complete=False), indent=1, default=str))
    data["load"], data["env"] = monitor.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    mismatched = [f"{r['reducer']}@{r['budget']}" for r in [full, *data["rows"]]
                  if "error" not in r and not r["kv_agree"]]
    data["kv_mismatch"] = mismatched
    md = "\n".join([
        "# Prefill / decode / KV / FLOPs vs visual-token budget" + (" (tiny smoke config)" if a.tiny else
                                                                     " (CPU, fp32)"), "",
        *T.header_lines(data["env"], data["load"], quiet), f"- jax device: {data['device']}", f"- git: {data['git']}",
        f"- command: `{data['command']}`" + (f" (resumed: {data['resumed_from']['rows']} rows from "
                                              f"`{data['resumed_from']['command']}` at git {data['resumed_from']['git']})"
                                              if "resumed_from" in data else ""),
        "- config: " + ("tiny (see json)" if a.tiny else describe_config(cfg))
        + f"; batch {a.batch}, {PREFIX}-token prefix + image + {QUESTION}-token question, padded to {full['seq']} "
        "tokens (the model's 32-token bucket), random weights",
        ("- method (`experiments/timing.py`): prefill = jitted prefill to first-token logits (TTFT, vision tower "
         f"included), median [min-max] ms of {repeats} ABBA rounds after a warm-up call (compile never timed); "
         "decode = slope of a least-squares fit of the decode loop's time on one prefill state at "
         f"{T.decode_lengths(new_tokens)} tokens, EOS disabled (ms/token, + intercept ms, residual rms ms), refused "
         "when not positive / not growing with the length"),
        (f"- KV = DecodeState.kv_bytes of the real prefill (caches for {new_tokens + 1} new tokens), checked equal "
         "to flops.kv_cache_bytes (column 'KV = analytic')"),
        (f"- GFLOPs = flops.prefill_cost(...).total at the {full['text_tokens']} text tokens the model runs "
         "(vision + projector + LLM: SwiGLU, GQA, LM head on the last token; in-LLM cuts that score with the "
         "next layer's attention add its key projection and their score rows, PrefillCost.llm_cuts) plus any "
         "shallow prefill "
         "(ConsensusDrop source='shallow'); 'LLM GFLOPs (FastV formula)' = FastV's L(4nd^2 + 2n^2d + 2ndm), "
         "LLM only, for comparison with papers"),
        ("- avg visual = visual tokens averaged over the decoder layers (in-LLM cuts: budget = that average "
         "for multi-cut methods, tokens after the cut for FastV-style ones; see jaxprune.reducers.registry)"),
        ("- realized = median [min-max] of the per-round ratios t_full / t (the full prefill timed in the same "
         f"ABBA rounds as each row, {repeats} rounds); FLOPs speedup = GFLOPs_full / GFLOPs; ratio = realized / FLOPs speedup"),
        "",
        md_table(["reducer", "budget", "stages", "avg visual", "prefill ms", "full prefill ms (paired)",
                  "decode ms/tok", "KV MiB",
                  "KV = analytic", "GFLOPs", "LLM GFLOPs (FastV formula)", "realized speedup", "FLOPs speedup",
                  "ratio", f">= {TARGET_RATIO}"], table),
        *[f"- note: {n}" for n in a.note],
        "", f"Target: realized prefill speedup >= {TARGET_RATIO} x the analytic FLOPs speedup at each budget.",
        "", "![prefill vs visual tokens]({png})", ""])
    data["complete"] = True
    if base is not None:
        png = br.with_suffix(base, ".png")
        md = md.replace("{png}", png.name)
        base.parent.mkdir(parents=True, exist_ok=True)
        plot(data["rows"], full, png, "prefill time vs visual tokens" + (
            " (tiny)" if a.tiny else f" ({cfg.text.num_hidden_layers}-layer bench config, CPU fp32)"))
        md_path, js_path = br.write_outputs(base, md, data)
        data["files"] = {"md": str(md_path), "json": str(js_path), "png": str(png)}
        print(f"wrote {md_path}, {png}")
    else:
        md = md.replace("![prefill vs visual tokens]({png})", "(no plot without --out)")
    print(md)
    if mismatched:
        raise AssertionError(f"DecodeState.kv_bytes != flops.kv_cache_bytes for {mismatched}")
    return data


if __name__ == "__main__":
    main()
