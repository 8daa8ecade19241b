"""What :mod:`experiments.bench_gpu` and its jaxprune worker (:mod:`experiments.bench_gpu_jax`) share: the
prompt geometry, the device peak table and the model configs (one module both import, so neither imports the
other).
"""

from __future__ import annotations

import dataclasses
import re

from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
PREFIX, QUESTION = 35, 40

# bf16 dense (no sparsity) tensor-core peak FLOP/s and HBM bandwidth (bytes/s), from NVIDIA's datasheets:
# H100 (SXM5 989.4 TFLOPS / 3.35 TB/s; PCIe 756 / 2.0; NVL 835 / 3.9: "H100 Tensor Core GPU" datasheet, the
# sparsity figures halved), H200 (SXM 989 / 4.8; NVL 835 / 4.8: "H200 Tensor Core GPU" datasheet), A100
# (312 TFLOPS; 80GB SXM 2.039 TB/s, 80GB PCIe 1.935, 40GB 1.555: "A100 Tensor Core GPU" datasheet).
# Rows: (slug, substrings that must all occur in the lower-cased device_kind, FLOP/s, bytes/s); first match wins.
PEAKS = (
    ("h100_nvl", ("h100", "nvl"), 835e12, 3.9e12),
    ("h100_pcie", ("h100", "pcie"), 756e12, 2.0e12),
    ("h100_sxm", ("h100",), 989.4e12, 3.35e12),
    ("h200_nvl", ("h200", "nvl"), 835e12, 4.8e12),
    ("h200_sxm", ("h200",), 989.4e12, 4.8e12),
    ("a100_pcie_80gb", ("a100", "pcie", "80"), 312e12, 1.935e12),
    ("a100_sxm_80gb", ("a100", "80"), 312e12, 2.039e12),
    ("a100_40gb", ("a100",), 312e12, 1.555e12),
)


def device_peaks(platform: str, kind: str) -> dict:
    """``{slug, peak_flops, peak_bw}`` for a device (``None`` peaks when unknown, e.g. CPU)."""
    k = kind.lower()
    if platform == "gpu" or "nvidia" in k:
        for slug, keys, fl, bw in PEAKS:
            if all(s in k for s in keys):
                return {"slug": slug, "peak_flops": fl, "peak_bw": bw}
    slug = "cpu" if platform == "cpu" else (re.sub(r"[^a-z0-9]+", "_", k).strip("_") or "unknown")
    return {"slug": slug, "peak_flops": None, "peak_bw": None}


# ---------------------------------------------------------------------------------------------------
# Configs
def llava15_7b() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf shapes: CLIP-L/14-336 (24 x 1024, 16 heads, 4096 MLP), Vicuna-7B (32 x 4096, 32
    heads, 11008 MLP, vocab 32064), feature layer -2, 'default' selection -> 576 visual tokens."""
    return LlavaConfig(vision=VisionConfig(), text=TextConfig(pad_token_id=0), image_token_index=32000)


def reduced_config() -> LlavaConfig:
    """CPU stand-in with LLaVA-1.5's token geometry: 336 px / patch 14 -> 576 visual tokens; CLIP 4 x 512
    (8 heads, MLP 2048), Llama 8 x 512 (8 heads of 64, MLP 1376), vocab 32064. About 1/100 of 7B's FLOPs."""
    return LlavaConfig(vision=VisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                           num_attention_heads=8),
                       text=TextConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=8, head_dim=64, pad_token_id=0),
                       image_token_index=32000)


def tiny_config() -> LlavaConfig:
    """Smoke test: 42 px / patch 7 -> 36 visual tokens, 4 decoder layers (FastV at 2 and multi-cut schedules)."""
    return LlavaConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=42, patch_size=7),
                       text=TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, pad_token_id=0),
                       image_token_index=299)


def model_config(model: str, size: str) -> LlavaConfig:
    base = {"full": llava15_7b, "reduced": reduced_config, "tiny": tiny_config}[size]()
    if model == "llava15":
        return base
    S = base.vision.image_size
    pins = PINPOINTS if S == 336 else tuple((S * (a // 336), S * (b // 336)) for a, b in PINPOINTS)
    return dataclasses.replace(base, model_type="llava_next", image_grid_pinpoints=pins)
