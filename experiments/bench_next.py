"""LLaVA-NeXT speed at full vs 640/320/160 visual tokens (the papers' 2880 = 5 x 576 convention).

Config: NeXT-shaped reduced width -- standard pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]],
CLIP 6 x 256 (336 px, patch 14), Llama 8 x 512 (inter 1376, vocab 32064) -- random weights. One square
image (2x2 grid: 2928 packed tokens incl. 48 newlines; 2880 = 5 x 576 without them) plus a 35-token
prefix and a 40-token question. Prefill = jitted prefill to first-token logits (vision tower on all
5 crops included); decode = ms per token of the jitted decode loop (EOS disabled); KV bytes from the
real prefill's caches. Budgets count visual tokens per image as the papers do (640/320/160 of 2880);
in-LLM methods keep ``budget`` tokens after layer 2 (FastV) or average it over layers (PyramidDrop).

Method (:mod:`experiments.timing`): one warm-up call per program (its time, compile included, is reported as
``first_s``); a reducer row's prefill is timed in ABBA rounds with the full model's prefill (realized speedup =
median of the per-round ratios, so load drift on a shared machine cannot fake it); decode = the slope of a
least-squares fit of the decode loop's time (one prefill state, EOS disabled) at several lengths, refused when
not positive or not growing with the length.

    python -m experiments.bench_next [--batch 1] [--repeats 3] [--tiny] [--out STEM] [--wait-quiet MIN]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

import jaxprune as jp
from experiments import timing as T
from experiments.bench_common import git_rev, jax_device, md_table, write_results
from jaxprune import engine
from jaxprune.config import LlavaConfig
from jaxprune.processing_anyres import max_crops, num_image_tokens

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
PREFIX, QUESTION, NEW = 35, 40, 16


def next_config(tiny: bool = False) -> LlavaConfig:
    from experiments.bench_common import bench_config

    base = bench_config()
    if tiny:
        v = dataclasses.replace(base.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=28, patch_size=7)
        t = dataclasses.replace(base.text, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, head_dim=8)
        pins = ((28, 56), (56, 28), (56, 56))
        return LlavaConfig(vision=v, text=t, model_type="llava_next", image_token_index=299, image_grid_pinpoints=pins)
    return dataclasses.replace(base, model_type="llava_next", image_grid_pinpoints=PINPOINTS)


def reducers(cfg: LlavaConfig, full: int) -> list[tuple[str, int, object]]:
    """(name, budget, spec) for the main reducers at budgets equivalent to 640/320/160 of 2880."""
    R = jp.reducers
    out = []
    for paper in (640, 320, 160):
        b = max(2, round(full * paper / 2880))
        out += [("fastervlm", paper, R.fastervlm(b)),
                ("visionzip", paper, R.visionzip.for_budget(b)),
                ("adafv", paper, R.adafv(b)),
                ("fastv", paper, R.fastv(layer=2, keep=b))]
    return out


def make_inputs(cfg: LlavaConfig, batch: int):
    S = cfg.vision.image_size
    size = (S * 2, S * 2)  # square -> 2x2 grid: the maximum token count
    n = num_image_tokens(size, cfg.image_grid_pinpoints, S, cfg.vision.patch_size)
    rng = np.random.default_rng(0)
    hi = min(cfg.text.vocab_size, cfg.image_token_index) - 1
    ids = np.concatenate([rng.integers(3, hi, (batch, PREFIX)), np.full((batch, n), cfg.image_token_index),
                          rng.integers(3, hi, (batch, QUESTION))], axis=1)
    C = max_crops(cfg.image_grid_pinpoints, S)
    px = rng.standard_normal((batch, C, 3, S, S)).astype(np.float32)
    return ids, px, np.asarray([size] * batch), n


def measure_row(model, ids, px, sizes, spec, repeats: int, baseline=None) -> dict:
    """One row: prefill (ABBA-paired with ``baseline``, the full model's prefill, when given), decode fit, KV
    bytes, LLM sequence length, compile / first-call seconds."""
    p = model.plan(ids, px, None, sizes, spec)
    comp = T.compile_seconds(model.programs.prefill, model.params, p.arrays, static=p.static, max_new_tokens=NEW + 1)

    def prefill():
        return jax.block_until_ready(engine.prefill(model, p, NEW + 1).first_logits)

    state = engine.prefill(model, p, NEW + 1)
    lengths = T.decode_lengths(NEW)
    fns = {"prefill": prefill}
    if baseline is not None:
        fns["full"] = baseline
    fns.update({n: (lambda n=n: jax.block_until_ready(engine.decode(model, state, n, eos_ids=(), pad_id=0)))
                for n in lengths})
    res = T.interleaved(fns, max(repeats, 3))  # a decode fit needs a few samples per length
    fit = T.fit_decode({n: res[n].samples for n in lengths})
    out = {"prefill": res["prefill"].to_dict(), "prefill_s": res["prefill"].median,
           "prefill_compile_s": comp["compile_s"], "prefill_lower_s": comp["lower_s"],
           "xla": T.xla_analysis(comp["compiled"]), "decode_fit": fit.to_dict(), "decode_s_per_tok": fit.per_token_s,
           "decode_first_s": {n: res[n].first_s for n in lengths}, "kv_bytes": state.kv_bytes,
           "llm_seq": state.caches[-1].capacity - (NEW + 1)}
    if baseline is not None:
        sp = res.ratio("full", "prefill")
        out.update(speedup=sp.median, speedup_stats=sp.to_dict(), full_prefill_paired_s=res["full"].median)
    out["run"] = prefill
    return out


def bench_row(model, ids, px, sizes, spec, repeats: int):
    """(prefill s, decode s/token or None if the fit was refused, kv bytes, LLM sequence length)."""
    r = measure_row(model, ids, px, sizes, spec, repeats)
    return r["prefill_s"], r["decode_s_per_tok"], r["kv_bytes"], r["llm_seq"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the results file (repeatable)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    import sys

    cfg = next_config(a.tiny)
    model = jp.Llava.random(cfg, seed=0)
    ids, px, sizes, n_tok = make_inputs(cfg, a.batch)
    full = 5 * cfg.tokens_per_image
    quiet = T.quiet_from_cli(a)
    rows, data = [], {"device": jax_device(), "git": git_rev(), "batch": a.batch, "repeats": a.repeats,
                      "command": "python -m experiments.bench_next " + " ".join(T.shorten_notes(sys.argv[1:] if argv is None else argv)),
                      "config": cfg.to_hf_dict(), "packed_tokens": n_tok, "full_convention": full, "quiet": quiet,
                      "runs": []}
    base = None
    with T.LoadMonitor() as lm:
        for name, paper, spec in [("full", 2880, None)] + reducers(cfg, full):
            t0 = time.perf_counter()
            try:
                r = measure_row(model, ids, px, sizes, spec, a.repeats, None if base is None else base["run"])
            except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
                rows.append([name, paper, "error", str(e)[:80]] + [""] * 6)
                data["runs"].append({"reducer": name, "budget": paper, "error": f"{type(e).__name__}: {e}"})
                continue
            base = base or r
            r = dict(reducer=name, budget=paper, spec=repr(spec), wall_s=time.perf_counter() - t0, **r)
            run = r.pop("run")
            if name == "full":
                base = dict(r, run=run)
            data["runs"].append(r)
            pre = T.Stats(**r["prefill"]["stats"])
            sp = T.Stats(**r["speedup_stats"]) if "speedup_stats" in r else None
            fit = T.Fit(**{k: v for k, v in r["decode_fit"].items() if k != "per_token_s"})
            rows.append([name, paper, r["llm_seq"], pre.fmt(), "1.00" if sp is None else
                         f"{sp.median:.2f} [{sp.min:.2f}-{sp.max:.2f}]", T.fmt_fit(fit),
                         f"{r['kv_bytes'] / 2**20:.2f}", f"{base['kv_bytes'] / r['kv_bytes']:.2f}x",
                         f"{r['prefill_compile_s']:.1f}"])
            print(rows[-1], flush=True)
    data["load"], data["env"] = lm.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    md = "\n".join([
        "# LLaVA-NeXT: prefill, decode and KV cache at full vs 640/320/160 (CPU, fp32)", "",
        *T.header_lines(data["env"], data["load"], quiet),
        f"- jax device: {data['device']}; git {data['git']}; batch {a.batch}; command: `{data['command']}`",
        "- config: standard pinpoints, CLIP 6x256 (336 px, patch 14), Llama 8x512 (inter 1376, vocab 32064), "
        f"random weights; one square image = {n_tok} packed visual tokens (2880 = 5 x 576 + 48 newlines); "
        f"{PREFIX}-token prefix + {QUESTION}-token question",
        "- budget column = visual tokens per image in the papers' convention (of 2880); FastV keeps that many "
        "after layer 2; newlines are pruned like other tokens (`next_options` default)",
        ("- method (`experiments/timing.py`): prefill = jitted prefill to first-token logits incl. the vision tower "
         f"on 5 crops, median [min-max] ms of {max(a.repeats, 3)} ABBA rounds after a warm-up; speedup = median "
         "[min-max] of the per-round ratios t_full / t with the full prefill timed in the same rounds; decode = slope "
         f"of a least-squares fit of the decode loop's time at {T.decode_lengths(NEW)} tokens on one prefill state "
         "(ms/token, + intercept ms, residual rms ms), refused if not positive / not growing; compile = lower + "
         "compile of the prefill program, timed apart"),
        *[f"\n{n}" for n in a.note],
        "", md_table(["reducer", "budget (of 2880)", "LLM seq (last segment)", "prefill ms", "prefill speedup (paired)",
                      "decode ms/tok", "KV MiB", "KV reduction", "prefill compile s"], rows), ""])
    stem = a.out or (None if a.tiny else "next_cpu")
    if stem:
        write_results(stem, md, data)
    print(md)
    return data


if __name__ == "__main__":
    main()
