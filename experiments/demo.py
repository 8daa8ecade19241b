"""The built-in default run: a small local LLaVA through the whole pipeline, no downloads.

Builds a small random LLaVA-1.5-shaped model, saves it as an HF checkpoint (safetensors), converts
it with ``checkpoints_convert`` and loads it back with ``jp.load`` (the real loading path), feeds
procedurally drawn images through the LLaVA 'pad' preprocessing, then runs the full model and
each available reducer at a few budgets, printing sequence length, prefill time, decode speed,
KV-cache bytes and agreement of greedy tokens with the full model.

Also the pieces the evaluation harness' built-in default run uses (``experiments.eval.builtin``): a tiny
word-level tokenizer matching ``DEMO_CFG`` (:func:`demo_tokenizer`, :func:`save_demo_tokenizer`) and
:func:`write_demo_checkpoint` (random weights -> HF checkpoint with that tokenizer -> converted directory).
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
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.processing import ImageProcessorConfig, preprocess_images

DEMO_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        image_size=96, patch_size=8),
    text=TextConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, eos_token_id=(2,), pad_token_id=0),
    image_token_index=511)


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
    """Random weights -> HF safetensors -> checkpoints_convert -> jp.load (exercises the real path)."""
    from checkpoints_convert import convert, export_hf

    src = jp.Llava.random(DEMO_CFG, seed=0)
    export_hf(DEMO_CFG, src.flat_params(), workdir / "hf", layout="legacy")
    convert(workdir / "hf", workdir / "converted")
    return jp.load(workdir / "converted")


# ---- tiny tokenizer -------------------------------------------------------------------------------
#: Words the demo tokenizer knows (lower-cased): the vicuna_v1 system prompt, the short-answer suffix and the
#: built-in shape benchmark (``experiments.eval.builtin``); anything else maps to ``<unk>``.
DEMO_WORDS: tuple[str, ...] = tuple(dict.fromkeys((
    "a chat between curious user and an artificial intelligence assistant . the gives helpful , detailed polite "
    "answers to ' s questions : answer question using single word or phrase with option letter from given choices "
    "directly is there in image this what how many of color shape square circle red green blue yellow white black "
    "orange purple yes no"
).split()))


def demo_tokenizer():
    """A word-level ``tokenizers.Tokenizer`` matching ``DEMO_CFG`` over :data:`DEMO_WORDS`
    (:func:`experiments.wordtok.word_tokenizer`)."""
    from experiments.wordtok import word_tokenizer

    return word_tokenizer(DEMO_WORDS, DEMO_CFG.text.vocab_size, DEMO_CFG.image_token_index)


def save_demo_tokenizer(dst: str | Path) -> Path:
    """Write the demo tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` (loadable with
    ``AutoTokenizer`` / ``PreTrainedTokenizerFast``; pad = ``<unk>`` = id 0 = ``DEMO_CFG.text.pad_token_id``)."""
    from experiments.wordtok import save_word_tokenizer

    return save_word_tokenizer(demo_tokenizer(), dst)


def write_demo_checkpoint(dst: str | Path, seed: int = 0) -> Path:
    """The demo model as a converted jaxprune directory with its tokenizer: random weights -> HF safetensors (+
    tokenizer files) -> ``checkpoints_convert.convert`` -> ``dst`` (which must not exist)."""
    from checkpoints_convert import convert, export_hf

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as d:
        tok = save_demo_tokenizer(Path(d) / "tokenizer")
        src = jp.Llava.random(DEMO_CFG, seed=seed)
        export_hf(DEMO_CFG, src.flat_params(), Path(d) / "hf", layout="legacy", support_dir=tok)
        convert(Path(d) / "hf", dst)
    return dst


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
