"""Shared pieces of the CPU/GPU benchmarks: configs, machine description, markdown tables (timing: the one
method in :mod:`experiments.timing`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

RESULTS = Path(__file__).resolve().parent / "results"


def bench_config(vocab: int = 32064, num_layers: int = 8) -> LlavaConfig:
    """LLaVA-1.5-shaped reduced-width config: 336 px / patch 14 -> 576 visual tokens,
    CLIP 6 x 256 (4 heads), Llama ``num_layers`` x 512 (8 heads), intermediate 1376, vocab 32064.

    ``num_layers=32`` is LLaVA-1.5-7B's depth (``bench_budgets`` default): multi-cut in-LLM schedules are
    then the real ones (PyramidDrop / ADSC cut after layers 2 / 8 / 16, VisionDrop after 8 / 16 / 24) and a
    64-token average is reachable (with 8 layers the first layer alone averages 576 / 8 = 72). The width
    stays 512: at 256 XLA:CPU runs the ~100-token layers that follow deep cuts at 120 GFLOP/s against 185
    at 672 tokens (512: 204 vs 254), which would measure small-GEMM overhead rather than pruning."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                            image_size=336, patch_size=14),
        text=TextConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=num_layers,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                        eos_token_id=(2,), pad_token_id=0),
        image_token_index=32000,
    )


def describe_config(cfg: LlavaConfig) -> str:
    """``CLIP 6x256 (336 px, patch 14 -> 576 tokens), Llama 8x512 (inter 1376, vocab 32064)``."""
    v, t = cfg.vision, cfg.text
    return (f"CLIP {v.num_hidden_layers}x{v.hidden_size} ({v.image_size} px, patch {v.patch_size} -> "
            f"{cfg.tokens_per_image} tokens), Llama {t.num_hidden_layers}x{t.hidden_size} ({t.num_attention_heads} "
            f"heads of {t.head_dim}, inter {t.intermediate_size}, vocab {t.vocab_size})")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def jax_device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} (jax {jax.__version__})"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def write_results(stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=1, default=str))
    return md, js


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
