"""LLaVA-NeXT speed at full vs 640/320/160 visual tokens (the papers' 2880 = 5 x 576 convention).

Config: NeXT-shaped reduced width -- standard pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]],
CLIP 6 x 256 (336 px, patch 14), Llama 8 x 512 (inter 1376, vocab 32064) -- random weights. One square
image (2x2 grid: 2928 packed tokens incl. 48 newlines; 2880 = 5 x 576 without them) plus a 35-token
prefix and a 40-token question. Prefill = jitted prefill to first-token logits (vision tower on all
5 crops included); decode = ms per token of the jitted decode loop (EOS disabled); KV bytes from the
real prefill's caches. Budgets count visual tokens per image as the papers do (640/320/160 of 2880);
in-LLM methods keep ``budget`` tokens after layer 2 (FastV) or average it over layers (PyramidDrop).

    python -m experiments.bench_next [--batch 1] [--repeats 3] [--tiny] [--out STEM]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

import jaxprune as jp
from experiments.bench_common import git_rev, jax_device, machine, md_table, timeit, write_results
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


def bench_row(model, ids, px, sizes, spec, repeats: int):
    """(prefill s, decode s/token, kv bytes, LLM sequence length)."""
    p = model.plan(ids, px, None, sizes, spec)

    def prefill(n):
        return engine.prefill(model, p, n)

    state = prefill(NEW + 1)
    t_pre = timeit(lambda: jax.block_until_ready(prefill(NEW + 1).first_logits), repeats)

    def decode(n):  # the decode loop alone, on one prefill state (caches sized for NEW + 1 tokens)
        def f():
            jax.block_until_ready(engine.decode(model, state, n, eos_ids=(), pad_id=0))
        return f

    t1, tn = timeit(decode(1), repeats), timeit(decode(NEW + 1), repeats)
    seq = state.caches[-1].capacity - (NEW + 1)
    return t_pre, (tn - t1) / NEW, state.kv_bytes, seq


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = next_config(a.tiny)
    model = jp.Llava.random(cfg, seed=0)
    ids, px, sizes, n_tok = make_inputs(cfg, a.batch)
    full = 5 * cfg.tokens_per_image
    rows, data = [], {"machine": machine(), "device": jax_device(), "git": git_rev(), "batch": a.batch,
                      "config": cfg.to_hf_dict(), "packed_tokens": n_tok, "full_convention": full, "runs": []}
    base = None
    for name, paper, spec in [("full", 2880, None)] + reducers(cfg, full):
        t0 = time.perf_counter()
        try:
            pre, dec, kv, seq = bench_row(model, ids, px, sizes, spec, a.repeats)
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            rows.append([name, paper, "error", str(e)[:80], "", "", "", ""])
            continue
        base = base or (pre, dec, kv)
        r = dict(reducer=name, budget=paper, spec=repr(spec), prefill_s=pre, decode_s_per_tok=dec, kv_bytes=kv,
                 llm_seq=seq, wall_s=time.perf_counter() - t0)
        data["runs"].append(r)
        rows.append([name, paper, seq, f"{pre * 1e3:.1f}", f"{base[0] / pre:.2f}x", f"{dec * 1e3:.2f}",
                     f"{kv / 2**20:.2f}", f"{base[2] / kv:.2f}x"])
        print(rows[-1], flush=True)
    md = "\n".join([
        "# LLaVA-NeXT: prefill, decode and KV cache at full vs 640/320/160 (CPU, fp32)", "",
        f"- machine: {data['machine']}; jax device: {data['device']}; git {data['git']}; batch {a.batch}",
        "- config: standard pinpoints, CLIP 6x256 (336 px, patch 14), Llama 8x512 (inter 1376, vocab 32064), "
        f"random weights; one square image = {n_tok} packed visual tokens (2880 = 5 x 576 + 48 newlines); "
        f"{PREFIX}-token prefix + {QUESTION}-token question",
        "- budget column = visual tokens per image in the papers' convention (of 2880); FastV keeps that many "
        "after layer 2; newlines are pruned like other tokens (`next_options` default)",
        f"- prefill = jitted prefill to first-token logits incl. the vision tower on 5 crops; decode = "
        f"(decode loop of {NEW + 1} tokens - of 1 token) / {NEW} on one prefill state; median of {a.repeats}; "
        "command: `python -m experiments.bench_next`",
        "", md_table(["reducer", "budget (of 2880)", "LLM seq (last segment)", "prefill ms", "prefill speedup",
                      "decode ms/tok", "KV MiB", "KV reduction"], rows), ""])
    stem = a.out or (None if a.tiny else "next_cpu")
    if stem:
        write_results(stem, md, data)
    print(md)
    return data


if __name__ == "__main__":
    main()
