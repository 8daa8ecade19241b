"""Prefill and decode speed of jaxprune vs transformers PyTorch (SDPA, fp32) on the same weights.

Config: :func:`bench_common.bench_config` (LLaVA-1.5 shape at reduced width), a 35-token prefix,
one image (576 tokens) and a ~40-token question. Prefill = time to the first token's logits (the
PyTorch side computes logits for the last position only, as its ``generate`` does); decode =
ms per generated token, from ``generate`` runs of 1 and N+1 new tokens (EOS disabled).

    python -m experiments.bench_forward [--batches 1 8] [--new-tokens 32] [--tiny]

Writes ``experiments/results/forward_cpu.md`` and ``.json`` (``--tiny`` writes nothing unless
``--out`` is given; the test suite uses it to keep the script alive).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from experiments.bench_common import bench_config, git_rev, jax_device, machine, md_table, timeit, write_results
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


def bench_jax(model: Llava, ids, mask, px, new_tokens: int, repeats: int):
    p = model.plan(ids, px, mask)

    def prefill(n):
        return engine.prefill(model, p, n)

    def run_prefill():
        jax.block_until_ready(prefill(new_tokens + 1).first_logits)

    def run_generate(n):
        def f():
            st = prefill(n)
            jax.block_until_ready(engine.decode(model, st, n, eos_ids=(), pad_id=0))
        return f

    t_pre = timeit(run_prefill, repeats)
    t1 = timeit(run_generate(1), repeats)
    tn = timeit(run_generate(new_tokens + 1), repeats)
    return t_pre, (tn - t1) / new_tokens


def bench_torch(hf, ids, mask, px, new_tokens: int, repeats: int):
    import torch

    ti, tm, tp = torch.tensor(ids), torch.tensor(mask), torch.tensor(px)

    def run_prefill():
        with torch.inference_mode():
            hf(input_ids=ti, pixel_values=tp, attention_mask=tm, logits_to_keep=1, use_cache=True)

    def run_generate(n):
        def f():
            with torch.inference_mode():
                hf.generate(input_ids=ti, pixel_values=tp, attention_mask=tm, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
        return f

    t_pre = timeit(run_prefill, repeats)
    t1 = timeit(run_generate(1), repeats)
    tn = timeit(run_generate(new_tokens + 1), repeats)
    return t_pre, (tn - t1) / new_tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None, help="results stem (default forward_cpu; none with --tiny)")
    a = ap.parse_args(argv)
    import torch

    cfg = tiny_config() if a.tiny else bench_config()
    model = Llava.random(cfg, seed=0)
    hf = None if a.no_torch else hf_model_from(model)
    rows, data = [], {"machine": machine(), "device": jax_device(), "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "git": git_rev(), "config": cfg.to_hf_dict(),
                      "prefix": PREFIX, "question": QUESTION, "new_tokens": a.new_tokens, "runs": []}
    for B in a.batches:
        ids, mask, px = make_inputs(cfg, B)
        jp_pre, jp_dec = bench_jax(model, ids, mask, px, a.new_tokens, a.repeats)
        r = {"batch": B, "seq": ids.shape[1], "jax_prefill_s": jp_pre, "jax_decode_s_per_tok": jp_dec}
        if hf is not None:
            pt_pre, pt_dec = bench_torch(hf, ids, mask, px, a.new_tokens, a.repeats)
            r.update(torch_prefill_s=pt_pre, torch_decode_s_per_tok=pt_dec,
                     prefill_ratio=jp_pre / pt_pre, decode_ratio=jp_dec / pt_dec)
        data["runs"].append(r)
        rows.append([B, ids.shape[1], f"{jp_pre * 1e3:.1f}", f"{r.get('torch_prefill_s', float('nan')) * 1e3:.1f}",
                     f"{r.get('prefill_ratio', float('nan')):.2f}", f"{jp_dec * 1e3:.2f}",
                     f"{r.get('torch_decode_s_per_tok', float('nan')) * 1e3:.2f}",
                     f"{r.get('decode_ratio', float('nan')):.2f}"])
        print(rows[-1], flush=True)
    md = "\n".join([
        "# Forward speed: jaxprune vs transformers (CPU, fp32)", "",
        f"- machine: {data['machine']}", f"- jax device: {data['device']}; torch {data['torch']} "
        f"({data['torch_threads']} threads, SDPA)", f"- git: {data['git']}",
        "- config: CLIP 6x256 (336 px, patch 14 -> 576 tokens), Llama 8x512 (inter 1376, vocab 32064), "
        f"{PREFIX}-token prefix + {QUESTION}-token question, same random weights on both sides",
        "- prefill = time to first-token logits (torch: logits_to_keep=1, as generate); decode = "
        f"(generate({a.new_tokens + 1}) - generate(1)) / {a.new_tokens}, EOS disabled; median of {a.repeats}",
        "- command: `python -m experiments.bench_forward`", "",
        md_table(["batch", "seq", "jax prefill ms", "torch prefill ms", "ratio", "jax decode ms/tok",
                  "torch decode ms/tok", "ratio"], rows),
        "", "Target: ratio <= 0.8 for prefill and decode.", ""])
    stem = a.out or (None if a.tiny else "forward_cpu")
    if stem:
        md_path, _ = write_results(stem, md, data)
        print(f"wrote {md_path}")
    print(md)
    return data


if __name__ == "__main__":
    main()
