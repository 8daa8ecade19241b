"""Each reducer's own time vs the pruned prefill it buys (target: overhead <= 5% of the pruned prefill).

For every registered reducer (:func:`jaxprune.reducers.registry.names`) at each budget:

* pruned prefill = jitted prefill to the first token's logits with that reducer (``jaxprune.engine.prefill`` of
  ``model.plan(..., reducer=spec)``, exactly what ``Llava.generate`` runs; vision tower included);
* own time = the reducer alone on the exact context it receives on this model and these inputs (captured
  by :mod:`experiments.capture`): ``jax.jit(reducer)(ctx)`` for vision / projector reducers, the whole
  cut (``jaxprune.engine.cuts.cut``: context build, reducer, sequence rebuild) for LLM-stage ones; a ``compose`` of
  several reducers sums its parts;
* overhead = own / pruned prefill, pass when <= 5%;
* reducers that run a shallow prefill on the full sequence before pruning (``shallow_layers > 0``:
  ConsensusDrop with source="shallow") get that pass timed separately (``jaxprune.engine.sequence.place_spans``
  + ``jaxprune.engine.vision.text_to_image``, as the engine runs it); it is not part of "own".

Config: :func:`bench_common.bench_config` (LLaVA-1.5 shape at reduced width, 576 visual tokens), the
``bench_forward`` prompt (35-token prefix, one image, 40-token question), batch 1, fp32.

    python -m experiments.bench_reducers [--budgets 64 128 192] [--batch 1] [--repeats 10] [--out STEM|PATH]

Writes ``experiments/results/reducers_cpu.md`` and ``.json``. ``--out`` takes a stem (written under
``experiments/results``) or a path (``dir/name`` or ``dir/name.md``); ``--tiny`` (tiny config, budgets
scaled to its token count, one repeat) writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import jax

from experiments import capture as cap_mod
from experiments import timing as T
from experiments.bench_common import RESULTS, bench_config, git_rev, jax_device, md_table
from experiments.bench_forward import PREFIX, QUESTION, make_inputs
from jaxprune import engine
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.model import Llava
from jaxprune.reducers import registry
from jaxprune.reducers.compose import as_tuple

TARGET_OVERHEAD = 0.05
REFERENCE_TOKENS = 576  # budgets are quoted for LLaVA-1.5; --tiny scales them to its own token count


# ---------------------------------------------------------------------------------------------------
# Shared with bench_budgets.
def tiny_config() -> LlavaConfig:
    """Smoke-test config: 84 px / patch 7 -> 144 visual tokens; 4 decoder layers (room for FastV at layer 2
    and three-cut schedules scaled from 32 layers)."""
    return LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=84, patch_size=7),
                       text=TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                       eos_token_id=(2,), pad_token_id=0),
                       image_token_index=299)


def scale_budgets(cfg: LlavaConfig, budgets) -> list[int]:
    """LLaVA-1.5 budgets moved to ``cfg``'s tokens per image (identity for the bench config)."""
    p = cfg.tokens_per_image
    return [b if p == REFERENCE_TOKENS else max(1, round(b * p / REFERENCE_TOKENS)) for b in budgets]


_MODELS: dict = {}


def load_model(cfg: LlavaConfig, seed: int = 0) -> Llava:
    """Random-weight model, cached per (config, seed) so that both benchmarks in one process share its
    compiled programs (``model.programs``)."""
    key = (cfg, seed)
    if key not in _MODELS:
        _MODELS[key] = Llava.random(cfg, seed=seed)
    return _MODELS[key]


def out_base(out: str | None, default_stem: str, tiny: bool) -> Path | None:
    """Where results go, without suffix: ``--out`` as a stem (under experiments/results) or a path."""
    if out is None:
        return None if tiny else RESULTS / default_stem
    p = Path(out)
    if p.suffix in (".md", ".json", ".png"):
        p = p.with_suffix("")
    if len(p.parts) == 1 and not p.is_absolute():
        p = RESULTS / p
    return p


def with_suffix(base: Path, suffix: str) -> Path:
    return base.parent / (base.name + suffix)


def write_outputs(base: Path, markdown: str, data: dict) -> tuple[Path, Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = with_suffix(base, ".md"), with_suffix(base, ".json")
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=1, default=str))
    return md, js


def command(module: str, argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", module, *T.shorten_notes(args)])


def prefill_runner(model: Llava, spec, ids, mask, px, programs: engine.Programs | None = None):
    """``run(n) -> DecodeState``: the jitted prefill (caches for ``n`` new tokens) of the full model
    (``spec=None``) or with reducer ``spec``: the prefill program of ``model.plan(...)``, exactly what
    ``Llava.generate`` runs (:func:`jaxprune.engine.prefill`). ``programs``: run it from these programs of the
    model's graph instead of ``model.programs`` (a baseline that survives ``model.programs.clear_cache()``).
    Returns ``(run, meta)``: the plan, the images per row and the text slots per row (the plan's rows minus
    their visual placeholder slots; bucket padding included)."""
    p = model.plan(ids, px, mask, None, spec)
    progs = model.programs if programs is None else programs

    def run(n):
        return progs.prefill(model.params, p.arrays, static=p.static, max_new_tokens=n)

    B, T = p.batch_shape
    ipr = p.arrays["pixel_values"].shape[0] // B
    return run, {"plan": p, "imgs_per_row": ipr, "text_tokens": T - ipr * p.static.layout.S_h}


def describe(spec) -> str:
    return "+".join(f"{r.stage}" + (f":{r.layer}" if r.stage == "llm" else "") for r in as_tuple(spec))


# ---------------------------------------------------------------------------------------------------
def bench_reducer(model: Llava, spec, ids, mask, px, new_tokens: int, repeats: int,
                  compiler_options: dict | None = None) -> dict:
    """Pruned prefill, own time (per part) and shallow-prefill time of one spec. ``compiler_options`` apply to
    the capture and the per-reducer programs only (never to the prefill); --tiny uses fast compiles."""
    run, _ = prefill_runner(model, spec, ids, mask, px)
    fns = {"prefill": lambda: jax.block_until_ready(run(new_tokens + 1).first_logits)}
    opts = compiler_options
    cap = cap_mod.capture(model, ids, px, spec, mask, compiler_options=opts)
    parts = []
    for i, (r, ctx) in enumerate(zip(cap.reducers, cap.contexts)):
        part = {"reducer": repr(r), "stage": r.stage}
        f = cap_mod.reducer_fn(model, r, with_cut=False, compiler_options=opts)
        fns[(i, "reducer_s")] = lambda f=f, ctx=ctx: jax.block_until_ready(f(model.params, ctx))
        if r.stage == "llm":
            part["layer"] = r.layer
            g = cap_mod.reducer_fn(model, r, with_cut=True, compiler_options=opts)
            fns[(i, "cut_s")] = lambda g=g, ctx=ctx: jax.block_until_ready(g(model.params, ctx))
        if r.stage == "projector" and getattr(r, "shallow_layers", 0):
            sf, args = cap_mod.shallow_fn(model, r, cap.plan.static.layout, opts), cap_mod.shallow_args(model, cap, ctx)
            t2i = sf(*args)
            part["shallow_layers"] = r.shallow_layers
            part["shallow_check_max_abs_diff"] = float(abs(t2i - ctx.text_to_image).max())
            fns[(i, "shallow_s")] = lambda sf=sf, args=args: jax.block_until_ready(sf(*args))
        parts.append(part)
    res = T.interleaved(fns, repeats)  # the pruned prefill and every part in the same ABBA rounds
    t_pre = res["prefill"].median
    own, shallow = 0.0, None
    for i, part in enumerate(parts):
        for key in ("reducer_s", "cut_s", "shallow_s"):
            if (i, key) in res.timings:
                part[key] = res[(i, key)].median
                part[key.replace("_s", "_stats")] = res[(i, key)].stats.to_dict()
        part["own_s"] = part.get("cut_s", part["reducer_s"])
        own += part["own_s"]
        if "shallow_s" in part:
            shallow = (shallow or 0.0) + part["shallow_s"]
    return {"stages": describe(spec), "prefill_s": t_pre, "prefill_stats": res["prefill"].stats.to_dict(),
            "own_s": own, "overhead": own / t_pre,
            "pass": own / t_pre <= TARGET_OVERHEAD, "shallow_s": shallow,
            "shallow_frac": None if shallow is None else shallow / t_pre, "parts": parts}


def _fmt_ms(s) -> str:
    return "" if s is None else f"{s * 1e3:.3f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64],
                    help="visual-token budgets as quoted for LLaVA-1.5 (576 tokens); --tiny scales them")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10; 1 with "
                    "--tiny); the pruned prefill and every part of a reducer alternate in the same ABBA rounds")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="the prefill's KV caches hold N+1 new tokens, as in bench_budgets (default 32; 2 with --tiny)")
    ap.add_argument("--reducers", nargs="+", default=None, help="subset of registered names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--out", default=None, help="results stem or path (default reducers_cpu; none with --tiny)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    cfg = tiny_config() if a.tiny else bench_config()
    repeats = a.repeats or (1 if a.tiny else 10)
    new_tokens = a.new_tokens or (2 if a.tiny else 32)
    budgets = scale_budgets(cfg, a.budgets)
    names = a.reducers or registry.names(cfg.model_type)
    model = load_model(cfg)
    ids, mask, px = make_inputs(cfg, a.batch)
    quiet = T.quiet_from_cli(a)
    monitor = T.LoadMonitor().__enter__()
    run_full, _ = prefill_runner(model, None, ids, mask, px)
    t_full_t = T.measure(lambda: jax.block_until_ready(run_full(new_tokens + 1).first_logits), repeats)
    t_full = t_full_t.median
    data = {"device": jax_device(), "quiet": quiet, "full_prefill_stats": t_full_t.stats.to_dict(), "git": git_rev(), "command": command(
        "experiments.bench_reducers", argv), "config": cfg.to_hf_dict(), "batch": a.batch, "prefix": PREFIX,
        "question": QUESTION, "seq": int(ids.shape[1]), "repeats": repeats, "new_tokens": new_tokens,
        "budgets": budgets, "target_overhead": TARGET_OVERHEAD, "full_prefill_s": t_full, "rows": []}
    rows = []
    for name in names:
        for budget in budgets:
            row = {"reducer": name, "budget": budget}
            try:
                spec = registry.make(name, budget, cfg)
                row["spec"] = repr(spec)
                row.update(bench_reducer(model, spec, ids, mask, px, new_tokens, repeats,
                                         cap_mod.FAST_COMPILE if a.tiny else None))
            except Exception as e:  # noqa: BLE001 - a reducer that cannot run at this budget is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            data["rows"].append(row)
            if "error" in row:
                rows.append([name, budget, "", "", "", "", "", "error: " + row["error"].replace("|", "/"), "", ""])
            else:
                rows.append([name, budget, row["stages"], _fmt_ms(row["prefill_s"]), _fmt_ms(row["own_s"]),
                             ", ".join(_fmt_ms(p["reducer_s"]) for p in row["parts"]),
                             f"{100 * row['overhead']:.2f}", "pass" if row["pass"] else "FAIL",
                             _fmt_ms(row["shallow_s"]),
                             "" if row["shallow_frac"] is None else f"{100 * row['shallow_frac']:.1f}"])
            print(rows[-1], flush=True)
    data["load"], data["env"] = monitor.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    md = "\n".join([
        "# Reducer overhead vs the pruned prefill" + (" (tiny smoke config)" if a.tiny else " (CPU, fp32)"), "",
        *T.header_lines(data["env"], data["load"], quiet), f"- jax device: {data['device']}", f"- git: {data['git']}",
        f"- command: `{data['command']}`",
        "- config: " + ("tiny (see json)" if a.tiny else "CLIP 6x256 (336 px, patch 14 -> 576 tokens), Llama 8x512 "
                        "(inter 1376, vocab 32064)") + f"; batch {a.batch}, {PREFIX}-token prefix + image + "
        f"{QUESTION}-token question ({ids.shape[1]} tokens), random weights",
        f"- full-model prefill (no reducer): {t_full * 1e3:.2f} ms",
        ("- pruned prefill = jitted prefill to first-token logits with the reducer (jaxprune.engine.prefill, as "
         "Llava.generate; vision tower included); own = the reducer on the context it receives in that run "
         "(captured), jitted alone; LLM-stage reducers: the whole cut (engine.cuts.cut: context incl. q/k recompute, "
         "reducer, sequence rebuild); a compose sums its parts ('reducer fn' lists each part's reducer call "
         "alone); shallow = ConsensusDrop-style shallow prefill on the full sequence, not part of own; "
         f"medians of {repeats} ABBA rounds in which the pruned prefill and every part are timed together "
         "(`experiments/timing.py`; warm-up calls, compile included, never timed)"), "",
        md_table(["reducer", "budget", "stages", "pruned prefill ms", "own ms", "reducer fn ms", "overhead %",
                  f"<= {100 * TARGET_OVERHEAD:.0f}%", "shallow prefill ms", "shallow %"], rows),
        "", (f"Target: own time <= {100 * TARGET_OVERHEAD:.0f}% of the pruned prefill "
             "(the shallow prefill is reported separately)."), ""])
    base = out_base(a.out, "reducers_cpu", a.tiny)
    if base is not None:
        md_path, js_path = write_outputs(base, md, data)
        data["files"] = {"md": str(md_path), "json": str(js_path)}
        print(f"wrote {md_path}")
    print(md)
    return data


if __name__ == "__main__":
    main()
