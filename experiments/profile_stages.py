"""Where the prefill time goes: per-stage timings of jaxprune vs transformers on CPU, with XLA's cost and
memory analysis of each jitted stage, and the attention schedules alone (issue 19's evidence).

Stages (both sides in this process, timed in the same ABBA rounds by :mod:`experiments.timing`):

* ``tower+projector``: jaxprune: the family's ``encode`` (CLIP layers up to the feature layer, projector, NeXT
  packing) jitted alone; transformers: ``model.model.get_image_features``;
* ``decoder``: the decoder layers over the whole sequence, building the KV caches (jaxprune:
  ``engine.decoder.decoder_prefill``; transformers: ``model.model.language_model(inputs_embeds=...,
  use_cache=True)``);
* ``lm head``: the last token's logits (final norm + LM head);
* ``whole prefill``: the real programs (jaxprune: the jitted prefill of ``model.plan``; transformers:
  ``model(..., logits_to_keep=1, use_cache=True)``).

Each jaxprune stage is measured twice: with the current CPU attention (``attention_cpu``'s default schedule)
and with the one-pass schedule every sequence used before issue 19 (``schedule="dense"``, forced by raising
``CPU_BLOCKED_MIN_T``). ``--attention`` adds the attention alone at the decoder's shape: each schedule vs
PyTorch's SDPA with an explicit causal bool mask (what HF passes for a padded batch) and with ``is_causal=True``
(what HF passes for an unpadded batch -- batch 1 -- through ``masking_utils``' ``_ignore_causal_mask_sdpa``: the
fused causal kernel, the one the ``whole prefill`` / ``decoder`` rows of transformers run here).

    python -m experiments.profile_stages [--configs forward standin-llava15 standin-next] [--batches 1]
        [--repeats 5] [--out stages_cpu] [--wait-quiet MIN]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import timing as T
from experiments.bench_common import bench_config, git_rev, md_table, write_results
from experiments.bench_gpu_setup import model_config
from jaxprune import engine, families
from jaxprune.engine import decoder as dec
from jaxprune.models import attention as A
from jaxprune.model import Llava

CONFIGS = ("forward", "standin-llava15", "standin-next", "tiny")


def config(name: str):
    if name == "forward":
        return "llava15", bench_config()
    if name == "tiny":  # smoke test
        from experiments.bench_forward import tiny_config

        return "llava15", tiny_config()
    return ("next" if name.endswith("next") else "llava15"), model_config(
        "next" if name.endswith("next") else "llava15", "reduced")


def inputs(kind: str, cfg, batch: int) -> dict:
    from experiments import bench_gpu_jax

    return bench_gpu_jax.make_inputs(kind, cfg, batch)


def hf_model(kind: str, model: Llava):
    import torch
    import transformers

    from jaxprune.checkpoints import hf_state_dict

    hc = (transformers.LlavaConfig if kind == "llava15" else transformers.LlavaNextConfig).from_dict(
        model.cfg.to_hf_dict())
    hc._attn_implementation = "sdpa"
    cls = (transformers.LlavaForConditionalGeneration if kind == "llava15"
           else transformers.LlavaNextForConditionalGeneration)
    hf = cls(hc)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in hf_state_dict(model.cfg, model.flat_params(), layout="v5").items()}
    hf.load_state_dict(sd, strict=False)
    return hf.eval().float()


def jax_stages(model: Llava, inp: dict, new: int, tag: str) -> tuple[dict, dict]:
    """Blocking callables of the jaxprune stages (fresh jits: traced with the attention settings in force now)
    and the XLA analysis of each."""
    p = model.plan(inp["ids"], inp["px"], inp["mask"], inp["sizes"], None)
    lay, fam, gd = p.static.layout, families.get(p.static.family), model.graphdef
    H = model.cfg.text.hidden_size

    def tower(params, arrays):
        m = nnx.merge(gd, params)
        return fam.encode(m, lay, (), arrays["pixel_values"], arrays["tables"], None, None, None)[0]

    def decoder(params, h, arrays):
        m = nnx.merge(gd, params)
        return dec.decoder_prefill(m, h, arrays["positions"], arrays["valid"], range(len(m.language.layers)),
                                   h.shape[1] + new)

    def head(params, h, arrays):
        m = nnx.merge(gd, params)
        last = dec.last_valid_index(arrays["valid"])
        return m.logits(jnp.take_along_axis(h, last[:, None, None], axis=1))

    h = jnp.zeros(p.arrays["input_ids"].shape + (H,), model.dtype)
    progs = engine.Programs(gd)
    fns, info = {}, {}
    for name, f, args, kw in (("tower+projector", tower, (model.params, p.arrays), {}),
                              ("decoder", decoder, (model.params, h, p.arrays), {}),
                              ("lm head", head, (model.params, h, p.arrays), {}),
                              ("whole prefill", progs.prefill, (model.params, p.arrays),
                               {"static": p.static, "max_new_tokens": new})):
        jf = f if name == "whole prefill" else jax.jit(f)
        c = T.compile_seconds(jf, *args, **kw)
        exe = c["compiled"]
        info[name] = {"compile_s": c["compile_s"], **T.xla_analysis(exe)}
        fns[(tag, name)] = lambda exe=exe, args=args: jax.block_until_ready(exe(*args))
    return fns, {"bucketed_seq": int(p.arrays["input_ids"].shape[1]), "stages": info}


def torch_stages(hf, inp: dict, cfg) -> dict:
    import torch

    ids = torch.tensor(inp["ids"])
    mask = torch.ones_like(ids)
    kw = {"pixel_values": torch.tensor(inp["px"])}
    if inp["sizes"] is not None:
        kw["image_sizes"] = torch.tensor(inp["sizes"])
    emb = torch.zeros(ids.shape + (cfg.text.hidden_size,))
    hs = torch.zeros(ids.shape + (cfg.text.hidden_size,))
    lm = hf.model.language_model

    def run(f):
        def g():
            with torch.inference_mode():
                f()
        return g

    return {("torch", "tower+projector"): run(lambda: hf.model.get_image_features(**kw)),
            ("torch", "decoder"): run(lambda: lm(inputs_embeds=emb, attention_mask=mask, use_cache=True)),
            ("torch", "lm head"): run(lambda: hf.lm_head(lm.norm(hs[:, -1:]))),
            ("torch", "whole prefill"): run(lambda: hf(input_ids=ids, attention_mask=mask, use_cache=True,
                                                       logits_to_keep=1, **kw))}


def attention_fns(cfg, B: int, T_: int, T_torch: int) -> dict:
    import torch

    t = cfg.text
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T_, t.num_attention_heads, t.head_dim)).astype(np.float32))
    kv = jnp.asarray(rng.standard_normal((B, T_, t.num_key_value_heads, t.head_dim)).astype(np.float32))
    valid = jnp.asarray(np.arange(T_)[None].repeat(B, 0) < T_torch)
    slots = jnp.broadcast_to(jnp.arange(T_)[None], (B, T_))
    mask = A.causal_mask(slots, slots, valid)
    fns = {}
    for sch in A.CPU_SCHEDULES:
        f = jax.jit(lambda q, k, v, m, s=sch: A.attention_cpu(q, k, v, m, True, s))
        fns[("attention", f"jax {sch}")] = lambda f=f: jax.block_until_ready(f(q, kv, kv, mask))
    tq = torch.randn(B, t.num_attention_heads, T_torch, t.head_dim)
    tk = torch.randn(B, t.num_key_value_heads, T_torch, t.head_dim)
    tm = torch.ones(B, 1, T_torch, T_torch, dtype=torch.bool).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns[("attention", "torch sdpa, bool mask (HF, padded batch)")] = lambda: sdpa(tq, tk, tk, attn_mask=tm)
    fns[("attention", "torch sdpa, is_causal (HF, unpadded batch)")] = lambda: sdpa(tq, tk, tk, is_causal=True)
    return fns


def gemm_fns(cfg, rows: int) -> dict:
    """The decoder's matmuls alone at ``rows`` tokens (fp32): q/k/v/o projections, gate/up, down, and the LM head
    on one row, each as a jitted ``x @ w`` vs ``torch.matmul``."""
    import torch

    t = cfg.text
    shapes = {"q/k/v/o proj": (rows, t.hidden_size, t.num_attention_heads * t.head_dim),
              "gate/up proj": (rows, t.hidden_size, t.intermediate_size),
              "down proj": (rows, t.intermediate_size, t.hidden_size),
              "lm head (1 row)": (1, t.hidden_size, t.vocab_size)}
    rng = np.random.default_rng(0)
    fns = {}
    for name, (m, k, n) in shapes.items():
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        f = jax.jit(lambda x, y: x @ y)
        fns[("gemm", f"jax {name}")] = lambda f=f, ja=ja, jb=jb: jax.block_until_ready(f(ja, jb))
        fns[("gemm", f"torch {name}")] = lambda ta=ta, tb=tb: torch.matmul(ta, tb)
    return fns, {name: 2.0 * m * k * n for name, (m, k, n) in shapes.items()}


def profile(name: str, batch: int, repeats: int, with_attention: bool, new: int = 17) -> dict:
    kind, cfg = config(name)
    model = Llava.random(cfg, seed=0)
    inp = inputs(kind, cfg, batch)
    hf = hf_model(kind, model)
    fns, info_new = jax_stages(model, inp, new, "jax")
    old = A.CPU_BLOCKED_MIN_T
    A.CPU_BLOCKED_MIN_T = 1 << 30  # every sequence takes the one-pass schedule: the pre-issue-19 path
    try:
        f_old, info_old = jax_stages(model, inp, new, "jax, one-pass attention (before)")
    finally:
        A.CPU_BLOCKED_MIN_T = old
    fns.update(f_old)
    fns.update(torch_stages(hf, inp, cfg))
    if with_attention:
        fns.update(attention_fns(cfg, batch, info_new["bucketed_seq"], int(inp["ids"].shape[1])))
        g, gflop = gemm_fns(cfg, batch * info_new["bucketed_seq"])
        fns.update(g)
    res = T.interleaved(fns, repeats)
    out = {"config": name, "model": kind, "batch": batch, "seq": int(inp["ids"].shape[1]),
           "bucketed_seq": info_new["bucketed_seq"], "xla": {"jax": info_new["stages"],
                                                             "jax, one-pass attention (before)": info_old["stages"]},
           "timings": {f"{k[0]} | {k[1]}": v.to_dict() for k, v in res.timings.items()}}
    stages = ("tower+projector", "decoder", "lm head", "whole prefill")
    rows = []
    for st in stages:
        tj, to, tt = res[("jax", st)], res[("jax, one-pass attention (before)", st)], res[("torch", st)]
        r = res.ratio(("jax", st), ("torch", st))
        ro = res.ratio(("jax, one-pass attention (before)", st), ("torch", st))
        x = info_new["stages"][st]
        rows.append([st, tj.stats.fmt(), to.stats.fmt(), tt.stats.fmt(), f"{r.median:.2f} [{r.min:.2f}-{r.max:.2f}]",
                     f"{ro.median:.2f}", "n/a" if x.get("xla_flops") is None else f"{x['xla_flops'] / 1e9:.1f}",
                     "n/a" if x.get("xla_bytes_accessed") is None else f"{x['xla_bytes_accessed'] / 2**20:.0f}",
                     "n/a" if x.get("temp_bytes") is None else f"{x['temp_bytes'] / 2**20:.0f}",
                     "n/a" if info_old["stages"][st].get("temp_bytes") is None else
                     f"{info_old['stages'][st]['temp_bytes'] / 2**20:.0f}"])
    out["table"] = rows
    if with_attention:
        out["attention"] = [[k[1], res[k].stats.fmt()] for k in res.timings if k[0] == "attention"]
        out["gemm"] = []
        for gname, fl in gflop.items():
            tj, tt = res[("gemm", f"jax {gname}")], res[("gemm", f"torch {gname}")]
            r = res.ratio(("gemm", f"jax {gname}"), ("gemm", f"torch {gname}"))
            out["gemm"].append([gname, tj.stats.fmt(digits=2), f"{fl / tj.median / 1e9:.0f}", tt.stats.fmt(digits=2),
                                f"{fl / tt.median / 1e9:.0f}", f"{r.median:.2f} [{r.min:.2f}-{r.max:.2f}]"])
    return out


def markdown(data: dict) -> str:
    lines = ["# Where the prefill time goes: jaxprune vs transformers per stage (CPU, fp32)", "",
             *T.header_lines(data["env"], data["load"], data.get("quiet")),
             f"- git {data['git']}; command: `{data['command']}`",
             ("- method (`experiments/timing.py`): every stage of both sides (and of jaxprune with the pre-issue-19 "
              f"one-pass attention) in the same {data['repeats']} ABBA rounds after one warm-up call each; cells = "
              "median [min-max] ms; ratio = median [min-max] of the per-round jax/torch ratios; jaxprune stages are "
              "AOT-compiled programs (compile never timed); XLA GFLOP / MiB accessed from `cost_analysis()` (a "
              "`while` loop's body counted once, so the flash schedule's attention is under-counted), temp MiB from "
              "`memory_analysis()`"),
             "- stages: tower+projector = CLIP to the feature layer + projector (+ NeXT packing); decoder = the "
             "decoder layers over the whole (bucketed) sequence with KV caches; lm head = final norm + LM head on the "
             "last token; whole prefill = the real programs (jaxprune prefill of `model.plan`; HF "
             "`model(..., logits_to_keep=1)`)", *[f"\n{n}" for n in data.get("notes", [])], ""]
    for r in data["runs"]:
        lines += [f"## {r['config']} ({r['model']}), batch {r['batch']}: {r['seq']} tokens (jaxprune bucket "
                  f"{r['bucketed_seq']})", "",
                  md_table(["stage", "jax ms (now)", "jax ms (one-pass attention, before)", "torch ms",
                            "jax / torch (now)", "jax / torch (before)", "XLA GFLOP (now)", "XLA MiB accessed (now)",
                            "temp MiB (now)", "temp MiB (before)"], r["table"]), ""]
        if r.get("attention"):
            lines += [f"Attention alone, one decoder layer's shape (batch {r['batch']}, {r['bucketed_seq']} tokens; "
                      f"torch at {r['seq']}):", "", md_table(["implementation", "ms"], r["attention"]), ""]
        if r.get("gemm"):
            lines += [f"The decoder's matmuls alone ({r['batch']} x {r['bucketed_seq']} rows, fp32; XLA's dot vs "
                      "PyTorch's MKL sgemm):", "", md_table(["matmul", "jax ms", "jax GFLOP/s", "torch ms",
                                                            "torch GFLOP/s", "jax / torch"], r["gemm"]), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS[:3]), choices=CONFIGS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-attention", action="store_true", help="skip the attention-alone table")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", default="stages_cpu", help="results stem under experiments/results ('' = none)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    quiet = T.quiet_from_cli(a)
    data = {"git": git_rev(), "command": "python -m experiments.profile_stages " + " ".join(
        T.shorten_notes(sys.argv[1:] if argv is None else argv)), "repeats": a.repeats, "quiet": quiet, "notes": a.note, "runs": []}
    with T.LoadMonitor() as lm:
        for name in a.configs:
            for b in a.batches:
                data["runs"].append(profile(name, b, a.repeats, not a.no_attention))
                print(md_table(["stage", "jax", "jax before", "torch", "ratio", "ratio before", "GFLOP", "MiB", "temp",
                                "temp before"], data["runs"][-1]["table"]), flush=True)
    data["load"], data["env"] = lm.stop(), T.environment()
    md = markdown(data)
    if a.out:
        write_results(a.out, md, data)
    print(md)
    return data


if __name__ == "__main__":
    main()
