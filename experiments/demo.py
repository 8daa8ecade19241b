"""A small random LLaVA through the whole pipeline, no downloads (``python -m experiments.demo``).

Builds a small random LLaVA-1.5-shaped model, saves it as an HF checkpoint (safetensors), converts
it with ``jaxprune.checkpoints.convert`` and loads it back with ``jp.load`` (the real loading path), feeds
procedurally drawn images through the LLaVA 'pad' preprocessing, then runs the full model and
each available reducer at a few budgets, printing sequence length, prefill time, decode speed,
KV-cache bytes and agreement of greedy tokens with the full model.

The model itself (``DEMO_CFG``, its tokenizer, :func:`write_demo_checkpoint`) lives in the library
(:mod:`jaxprune.eval.demo_model`, ``jaxprune-eval --model demo``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL.Image

import jaxprune as jp
from experiments.bench_common import md_table
from jaxprune.eval.demo_model import DEMO_CFG
from jaxprune.processing import ImageProcessorConfig, preprocess_images


def demo_images(n: int, seed: int = 0) -> list[PIL.Image.Image]:
    """Coloured shapes on a noisy background, various aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(80, 200)), int(rng.integers(80, 200))
        a = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            a[y0:y0 + 20, x0:x0 + 20] = rng.integers(0, 255, 3)
        out.append(PIL.Image.fromarray(a))
    return out


def demo_model(workdir: Path) -> jp.Llava:
    """Random weights -> HF safetensors -> jaxprune.checkpoints.convert -> jp.load (exercises the real path)."""
    from jaxprune.checkpoints import convert, export_hf

    src = jp.Llava.random(DEMO_CFG, seed=0)
    export_hf(DEMO_CFG, src.flat_params(), workdir / "hf", layout="legacy")
    convert(workdir / "hf", workdir / "converted")
    return jp.load(workdir / "converted")


def reducers_to_try(P: int) -> list[tuple[str, object]]:
    import jaxprune.reducers as R

    out = []
    for frac in (1 / 3, 2 / 9, 1 / 9):
        k = max(1, round(P * frac))
        for name in ("fastervlm", "visionzip", "adafv", "divprune", "consensusdrop", "random_prune", "uniform"):
            fac = getattr(R, name, None)
            if fac is None:
                continue
            if name == "visionzip":
                d = max(1, round(k * 54 / 64))
                out.append((f"visionzip({d}+{k - d})", fac(d, k - d) if k - d > 0 else fac(k, 1)))
            else:
                out.append((f"{name}({k})", fac(k)))
    return out


def run(batch: int = 2, new_tokens: int = 16) -> str:
    with tempfile.TemporaryDirectory() as d:
        model = demo_model(Path(d))
    cfg = model.cfg
    P = cfg.tokens_per_image
    px = preprocess_images(demo_images(batch), ImageProcessorConfig(image_size=cfg.vision.image_size,
                                                                    shortest_edge=cfg.vision.image_size))
    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.integers(3, 500, (batch, 12)), np.full((batch, P), cfg.image_token_index),
                          rng.integers(3, 500, (batch, 10))], axis=1)
    rows = []
    ref = None
    for name, r in [("full", None)] + reducers_to_try(P):
        t0 = time.perf_counter()
        out = model(ids, px, reducer=r)
        jax.block_until_ready(out.logits)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model(ids, px, reducer=r)
        jax.block_until_ready(out.logits)
        t_fwd = time.perf_counter() - t0
        toks = np.asarray(model.generate(ids, px, reducer=r, max_new_tokens=new_tokens, eos_token_id=()))
        if ref is None:
            ref = toks
        seq = out.logits.shape[1]
        kv = 2 * batch * (seq + new_tokens) * cfg.text.num_key_value_heads * cfg.text.head_dim * 4 * \
            cfg.text.num_hidden_layers
        rows.append([name, seq - (ids.shape[1] - P), seq, f"{t_fwd * 1e3:.1f}", f"{t_first:.1f}",
                     f"{kv / 1024:.0f}", f"{(toks == ref).mean():.2f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return md_table(["reducer", "visual tokens", "LLM seq", "forward ms", "first call s (compile)",
                     "KV KiB", "greedy agreement"], rows)


def main() -> None:
    print("jaxprune demo: small random LLaVA (HF checkpoint -> convert -> load), full model vs reducers\n")
    print(run())
