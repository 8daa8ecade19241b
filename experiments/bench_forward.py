"""Prefill and decode speed of jaxprune vs transformers PyTorch (SDPA, fp32) on the same weights.

Config: :func:`bench_common.bench_config` (LLaVA-1.5 shape at reduced width), a 35-token prefix,
one image (576 tokens) and a ~40-token question. Method (:mod:`experiments.timing`):

* prefill = time to the first token's logits: jaxprune's prefill program (``engine.prefill``; the prompt
  padded to the 32-token bucket, 651 -> 672) vs ``model(..., logits_to_keep=1, use_cache=True)`` (what
  ``generate`` runs first); the two sides alternate in ABBA rounds in this process, after one warm-up call
  each (jaxprune's compile is timed apart, ``lower`` + ``compile``); ratio = median of the per-round ratios;
* decode = ms per generated token, the slope of a least-squares line through the times at several
  generation lengths (:func:`experiments.timing.decode_lengths`): jaxprune's decode loop (``engine.decode``) on
  one prefill state, transformers' ``generate(n)`` (EOS disabled, ``min_new_tokens = n``; its prefill is in the
  intercept); all (side, length) calls interleaved in ABBA rounds; a fit with a non-positive slope or
  medians that do not grow with the length is refused, never reported.

    python -m experiments.bench_forward [--batches 1 8] [--new-tokens 32] [--repeats 5] [--tiny] [--wait-quiet MIN]

Writes ``experiments/results/forward_cpu.md`` and ``.json`` (``--tiny`` writes nothing unless ``--out`` is given;
the test suite uses it to keep the script alive).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from experiments import timing as T
from experiments.bench_common import bench_config, git_rev, jax_device, md_table, write_results
from jaxprune import engine
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.model import Llava

PREFIX, QUESTION = 35, 40


def tiny_config() -> LlavaConfig:
    return LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=7),
                       text=TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                       eos_token_id=(2,), pad_token_id=0),
                       image_token_index=299)


def make_inputs(cfg: LlavaConfig, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hi = min(cfg.text.vocab_size, cfg.image_token_index) - 1
    ids = np.concatenate([rng.integers(3, hi, (batch, PREFIX)),
                          np.full((batch, cfg.tokens_per_image), cfg.image_token_index),
                          rng.integers(3, hi, (batch, QUESTION))], axis=1)
    px = rng.standard_normal((batch, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, np.ones_like(ids), px


def hf_model_from(model: Llava):
    """The same weights in a transformers ``LlavaForConditionalGeneration`` (SDPA attention)."""
    import torch
    from transformers import LlavaConfig as HFConfig, LlavaForConditionalGeneration

    from jaxprune.checkpoints import hf_state_dict

    cfg = dataclasses.replace(model.cfg)
    hf_cfg = HFConfig.from_dict(cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(hf_cfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state_dict(cfg, model.flat_params(), layout="v5").items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing}, unexpected {unexpected}")
    return hf.eval().float()


def jax_side(model: Llava, ids, mask, px, lengths: list[int]) -> tuple[dict, dict]:
    """``({"prefill": fn, ("decode", n): fn}, compile info)``: blocking callables of jaxprune's programs."""
    p = model.plan(ids, px, mask)
    top = max(lengths)
    comp = T.compile_seconds(model.programs.prefill, model.params, p.arrays, static=p.static, max_new_tokens=top)
    info = {"prefill_lower_s": comp["lower_s"], "prefill_compile_s": comp["compile_s"],
            **{f"prefill_{k}": v for k, v in T.xla_analysis(comp["compiled"]).items()},
            "bucketed_seq": int(p.arrays["input_ids"].shape[1])}
    state = engine.prefill(model, p, top)

    def prefill():
        jax.block_until_ready(engine.prefill(model, p, top).first_logits)

    fns = {"prefill": prefill}
    for n in lengths:
        fns[("decode", n)] = lambda n=n: jax.block_until_ready(engine.decode(model, state, n, eos_ids=(), pad_id=0))
    return fns, info


def torch_side(hf, ids, mask, px, lengths: list[int]) -> dict:
    import torch

    ti, tm, tp = torch.tensor(ids), torch.tensor(mask), torch.tensor(px)

    def prefill():
        with torch.inference_mode():
            hf(input_ids=ti, pixel_values=tp, attention_mask=tm, logits_to_keep=1, use_cache=True)

    def generate(n):
        def f():
            with torch.inference_mode():
                hf.generate(input_ids=ti, pixel_values=tp, attention_mask=tm, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
        return f

    return {"prefill": prefill, **{("decode", n): generate(n) for n in lengths}}


def bench_batch(model: Llava, hf, B: int, new_tokens: int, repeats: int) -> dict:
    """One batch size: both sides' callables measured in the same ABBA rounds."""
    cfg = model.cfg
    ids, mask, px = make_inputs(cfg, B)
    lengths = T.decode_lengths(new_tokens)
    jf, info = jax_side(model, ids, mask, px, lengths)
    fns = {("jax", k): f for k, f in jf.items()}
    if hf is not None:
        fns.update({("torch", k): f for k, f in torch_side(hf, ids, mask, px, lengths).items()})
    res = T.interleaved(fns, repeats)
    r = {"batch": B, "seq": int(ids.shape[1]), "decode_lengths": lengths, "jax_compile": info,
         "jax_prefill": res[("jax", "prefill")].to_dict(), "jax_prefill_s": res[("jax", "prefill")].median}
    fits = {}
    for side in ("jax", "torch") if hf is not None else ("jax",):
        fit = T.fit_decode({n: res[(side, ("decode", n))].samples for n in lengths})
        fits[side] = fit
        r[f"{side}_decode_fit"] = fit.to_dict()
        r[f"{side}_decode_s_per_tok"] = fit.per_token_s
        r[f"{side}_decode_first_s"] = {n: res[(side, ("decode", n))].first_s for n in lengths}
    if hf is not None:
        r["torch_prefill"] = res[("torch", "prefill")].to_dict()
        r["torch_prefill_s"] = res[("torch", "prefill")].median
        ratio = res.ratio(("jax", "prefill"), ("torch", "prefill"))
        r["prefill_ratio_stats"] = ratio.to_dict()
        r["prefill_ratio"] = ratio.median
        ok = fits["jax"].ok and fits["torch"].ok
        r["decode_ratio"] = fits["jax"].slope / fits["torch"].slope if ok else None
    return r


def _row(r: dict) -> list:
    na = "n/a"
    pj = T.Stats(**r["jax_prefill"]["stats"])
    pt = T.Stats(**r["torch_prefill"]["stats"]) if "torch_prefill" in r else None
    rs = T.Stats(**r["prefill_ratio_stats"]) if "prefill_ratio_stats" in r else None
    fj = T.Fit(**{k: v for k, v in r["jax_decode_fit"].items() if k != "per_token_s"})
    ft = T.Fit(**{k: v for k, v in r["torch_decode_fit"].items() if k != "per_token_s"}) if "torch_decode_fit" in r else None
    return [r["batch"], f"{r['seq']} ({r['jax_compile']['bucketed_seq']})", pj.fmt(), pt.fmt() if pt else na,
            f"{rs.median:.2f} [{rs.min:.2f}-{rs.max:.2f}]" if rs else na,
            T.fmt_fit(fj), T.fmt_fit(ft) if ft else na,
            na if r.get("decode_ratio") is None else f"{r['decode_ratio']:.2f}",
            f"{r['jax_compile']['prefill_compile_s']:.1f}"]


def markdown(data: dict, a) -> str:
    return "\n".join([
        "# Forward speed: jaxprune vs transformers (CPU, fp32)", "",
        *T.header_lines(data["env"], data["load"], data.get("quiet")),
        f"- git: {data['git']}; command: `{data['command']}`",
        "- config: CLIP 6x256 (336 px, patch 14 -> 576 tokens), Llama 8x512 (inter 1376, vocab 32064), "
        f"{PREFIX}-token prefix + {QUESTION}-token question, same random weights on both sides",
        ("- method (`experiments/timing.py`): both sides in this process, one warm-up call each, then "
         f"{a.repeats} ABBA rounds; prefill = time to first-token logits (torch: logits_to_keep=1, as generate; jax: "
         "the prefill program on the prompt padded to the 32-token bucket, seq column in brackets); cells = median "
         "[min-max] ms; ratio = median [min-max] of the per-round jax/torch ratios; decode = slope of a least-squares "
         f"fit of time vs tokens at lengths {data['runs'][0]['decode_lengths'] if data['runs'] else '?'} "
         "(ms/token, + intercept ms, residual rms ms): jax = decode loop on one prefill state, torch = "
         "generate(n) (its prefill in the intercept), EOS disabled; decode ratio = slope / slope"),
        "- jax compile = lower + compile of the prefill program, timed apart (never in a timed call)", "",
        md_table(["batch", "seq (jax bucket)", "jax prefill ms", "torch prefill ms", "prefill ratio",
                  "jax decode ms/tok", "torch decode ms/tok", "decode ratio", "jax prefill compile s"],
                 [_row(r) for r in data["runs"]]),
        "", "Target: ratio <= 0.8 for prefill and decode.", *[f"\n{n}" for n in a.note], ""])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the results file (repeatable)")
    ap.add_argument("--out", default=None, help="results stem (default forward_cpu; none with --tiny)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    import sys

    import torch

    cfg = tiny_config() if a.tiny else bench_config()
    model = Llava.random(cfg, seed=0)
    hf = None if a.no_torch else hf_model_from(model)
    quiet = T.quiet_from_cli(a)
    data = {"device": jax_device(), "git": git_rev(), "command": "python -m experiments.bench_forward "
            + " ".join(T.shorten_notes(sys.argv[1:] if argv is None else argv)), "config": cfg.to_hf_dict(), "prefix": PREFIX,
            "question": QUESTION, "new_tokens": a.new_tokens, "repeats": a.repeats, "quiet": quiet, "runs": [],
            "torch": torch.__version__}
    with T.LoadMonitor() as lm:
        for B in a.batches:
            data["runs"].append(bench_batch(model, hf, B, a.new_tokens, a.repeats))
            print(_row(data["runs"][-1]), flush=True)
    data["load"], data["env"] = lm.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    md = markdown(data, a)
    stem = a.out or (None if a.tiny else "forward_cpu")
    if stem:
        md_path, _ = write_results(stem, md, data)
        print(f"wrote {md_path}")
    print(md)
    return data


if __name__ == "__main__":
    main()
