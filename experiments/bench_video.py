"""Video-LLaVA speed on one 8-frame video: TTFT, decode ms/token and KV bytes at the full 2056 visual tokens and at
reduced budgets (FasterVLM per frame, FastV, DyCoke), CPU, fp32, random weights.

Config: Video-LLaVA-shaped reduced width -- two CLIP towers 6 x 256 (224 px, patch 14: 256 patches + CLS = 257
tokens per frame, 8 frames = 2056 ``<video>`` tokens), Llama 8 x 512 (inter 1376, vocab 32064). One video row:
``USER: <video>\\n{question} ASSISTANT:`` shaped as a 5-token prefix, the 2056 video tokens and a 20-token question.
TTFT = the jitted prefill to first-token logits, the video tower on all 8 frames included; decode = ms per token of
the jitted decode loop (EOS disabled); KV bytes from the real prefill's caches. Budgets count the *video's* tokens
reaching the LLM (:func:`jaxprune.reducers.registry.visual_tokens` = 2056) and are built with
``registry.make(name, budget, cfg)`` as ``jaxprune-eval --reducer NAME:BUDGET`` does (FasterVLM spreads its budget
per frame, FastV keeps ``budget`` after layer 2, DyCoke keeps frames 0/4/6 whole and prunes 1/2/3/5/7 -- the
official comparison pairs -- to ``(budget - 771) // 5`` tokens each).

Method (:mod:`experiments.timing`): one warm-up call per program (``first_s``, compile included); a reducer row's
prefill is timed in ABBA rounds with the full model's prefill (speedup = median of the per-round ratios); decode =
slope of a least-squares fit of the decode loop's time at several lengths, refused when not positive or not
growing; compile (lower + compile of the prefill program) timed apart.

    python -m experiments.bench_video [--repeats 3] [--tiny] [--out STEM] [--wait-quiet MIN]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np

import jaxprune as jp
from experiments import timing as T
from experiments.bench_common import bench_config, git_rev, jax_device, md_table, write_results
from jaxprune import engine
from jaxprune.config import LlavaConfig
from jaxprune.reducers import registry

PREFIX, QUESTION, NEW = 5, 20, 16
BUDGETS = (("fastervlm", 1024), ("fastervlm", 512), ("fastervlm", 256), ("fastv", 512), ("fastv", 256),
           ("dycoke", 1542), ("dycoke", 1028))


def video_config(tiny: bool = False) -> LlavaConfig:
    """The reduced-width Video-LLaVA config (``tiny``: a 28 px / 4-frame one for the tests)."""
    base = bench_config()
    if tiny:
        v = dataclasses.replace(base.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=28, patch_size=7)
        t = dataclasses.replace(base.text, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, head_dim=8)
        return LlavaConfig(vision=v, text=t, model_type="video_llava", image_token_index=298, video_token_index=299,
                           num_frames=4)
    v = dataclasses.replace(base.vision, image_size=224)
    return dataclasses.replace(base, vision=v, model_type="video_llava", image_token_index=32000,
                               video_token_index=32001, num_frames=8)


def budgets(cfg: LlavaConfig, tiny: bool) -> list[tuple[str, int]]:
    """(reducer, budget) rows; the tiny config scales the budgets to its 4 x 17 = 68 tokens."""
    if not tiny:
        return list(BUDGETS)
    return [("fastervlm", 32), ("fastv", 32), ("dycoke", 40)]


def make_inputs(cfg: LlavaConfig, batch: int = 1):
    """``input_ids [B, T]`` with the video's placeholders and ``pixel_values_videos [B, F, 3, S, S]``."""
    rng = np.random.default_rng(0)
    hi = min(cfg.text.vocab_size, cfg.image_token_index) - 1
    ids = np.concatenate([rng.integers(3, hi, (batch, PREFIX)),
                          np.full((batch, cfg.tokens_per_video), cfg.video_token_index),
                          rng.integers(3, hi, (batch, QUESTION))], axis=1)
    S = cfg.vision.image_size
    px = rng.standard_normal((batch, cfg.num_frames, 3, S, S)).astype(np.float32)
    return ids, px


def measure_row(model, ids, px, spec, repeats: int, baseline=None) -> dict:
    """Prefill (ABBA-paired with ``baseline`` when given), decode fit, KV bytes, LLM length, compile seconds."""
    p = model.plan(ids, None, None, None, spec, pixel_values_videos=px)
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
    res = T.interleaved(fns, max(repeats, 3))
    fit = T.fit_decode({n: res[n].samples for n in lengths})
    out = {"prefill": res["prefill"].to_dict(), "prefill_s": res["prefill"].median,
           "prefill_first_s": res["prefill"].first_s, "prefill_compile_s": comp["compile_s"],
           "prefill_lower_s": comp["lower_s"], "xla": T.xla_analysis(comp["compiled"]), "decode_fit": fit.to_dict(),
           "decode_s_per_tok": fit.per_token_s, "kv_bytes": state.kv_bytes,
           "llm_seq": state.caches[-1].capacity - (NEW + 1)}
    if baseline is not None:
        sp = res.ratio("full", "prefill")
        out.update(speedup=sp.median, speedup_stats=sp.to_dict(), full_prefill_paired_s=res["full"].median)
    out["run"] = prefill
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (tests); writes nothing without --out")
    ap.add_argument("--out", default=None, help="results stem under experiments/results (default video_cpu)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the results file (repeatable)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    cfg = video_config(a.tiny)
    model = jp.Llava.random(cfg, seed=0)
    ids, px = make_inputs(cfg)
    full = cfg.tokens_per_video
    quiet = T.quiet_from_cli(a)
    cmd = "python -m experiments.bench_video " + " ".join(T.shorten_notes(sys.argv[1:] if argv is None else argv))
    data = {"device": jax_device(), "git": git_rev(), "batch": 1, "repeats": a.repeats, "command": cmd,
            "config": cfg.to_hf_dict(), "video_tokens": full, "new_tokens": NEW, "quiet": quiet, "runs": []}
    rows, base = [], None
    with T.LoadMonitor() as lm:
        for name, budget in [("full", full)] + budgets(cfg, a.tiny):
            spec = None if name == "full" else registry.make(name, budget, cfg)
            t0 = time.perf_counter()
            try:
                r = measure_row(model, ids, px, spec, a.repeats, None if base is None else base["run"])
            except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
                rows.append([name, budget, "error", str(e)[:80]] + [""] * 6)
                data["runs"].append({"reducer": name, "budget": budget, "error": f"{type(e).__name__}: {e}"})
                continue
            run = r.pop("run")
            r = dict(reducer=name, budget=budget, spec=repr(spec), wall_s=time.perf_counter() - t0, **r)
            if name == "full":
                base = dict(r, run=run)
            data["runs"].append(r)
            pre = T.Stats(**r["prefill"]["stats"])
            sp = T.Stats(**r["speedup_stats"]) if "speedup_stats" in r else None
            fit = T.Fit(**{k: v for k, v in r["decode_fit"].items() if k != "per_token_s"})
            rows.append([name, budget, r["llm_seq"], pre.fmt(), "1.00" if sp is None else
                         f"{sp.median:.2f} [{sp.min:.2f}-{sp.max:.2f}]", T.fmt_fit(fit),
                         f"{r['kv_bytes'] / 2**20:.2f}", f"{base['kv_bytes'] / r['kv_bytes']:.2f}x",
                         f"{r['prefill_compile_s']:.1f}"])
            print(rows[-1], flush=True)
    data["load"], data["env"] = lm.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    v, t = cfg.vision, cfg.text
    md = "\n".join([
        f"# Video-LLaVA: TTFT, decode and KV cache at full {full} vs reduced video budgets (CPU, fp32)", "",
        *T.header_lines(data["env"], data["load"], quiet),
        f"- jax device: {data['device']}; git {data['git']}; batch 1; command: `{cmd}`",
        f"- config: Video-LLaVA shaped, reduced width: CLIP towers {v.num_hidden_layers}x{v.hidden_size} "
        f"({v.image_size} px, patch {v.patch_size}: {cfg.tokens_per_frame} tokens per frame incl. its CLS), "
        f"{cfg.num_frames} frames = {full} video tokens; Llama {t.num_hidden_layers}x{t.hidden_size} (inter "
        f"{t.intermediate_size}, vocab {t.vocab_size}); random weights; {PREFIX}-token prefix + {QUESTION}-token "
        "question",
        "- budget = the video's tokens reaching the LLM (of the full count), `registry.make(name, budget, cfg)` as "
        "`jaxprune-eval --reducer NAME:BUDGET`: fastervlm per frame (budget // frames each, by that frame's CLS "
        "attention), fastv keeps `budget` after layer 2 (the layers before see all), dycoke keeps the frames its "
        "official pairs do not prune whole (8 frames: 0/4/6) and `(budget - whole) // pruned` tokens of each pruned "
        "one (1/2/3/5/7), so its LLM length can sit a few tokens under the budget (TTM only, no decode-time KV "
        "pruning)",
        ("- method (`experiments/timing.py`): TTFT = jitted prefill to first-token logits incl. the video tower on "
         f"every frame, median [min-max] ms of {max(a.repeats, 3)} ABBA rounds after a warm-up; speedup = median "
         "[min-max] of the per-round ratios t_full / t, the full prefill timed in the same rounds; decode = slope of "
         f"a least-squares fit of the decode loop's time at {T.decode_lengths(NEW)} tokens on one prefill state "
         "(ms/token, + intercept ms, residual rms ms), refused if not positive / not growing; KV = bytes of the "
         f"static caches (prompt + {NEW + 1} slots); compile = lower + compile of the prefill, timed apart"),
        "- the machine is shared (2 cores, other jobs running): absolute times carry that load (see the load line); "
        "the paired speedups are the robust figures",
        *[f"\n{n}" for n in a.note],
        "", md_table(["reducer", "budget (of %d)" % full, "LLM seq (last segment)", "TTFT ms", "TTFT speedup (paired)",
                      "decode ms/tok", "KV MiB", "KV reduction", "prefill compile s"], rows), ""])
    stem = a.out or (None if a.tiny else "video_cpu")
    if stem:
        write_results(stem, md, data)
    print(md)
    return data


if __name__ == "__main__":
    main()
