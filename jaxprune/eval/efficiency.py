"""Efficiency accounting of one run (see ``/work/shared/reference/eval.md`` section 4), every number labelled.

* ``ttft_ms``: prefill of one batch *with the vision tower included* plus the first-token argmax, median of a
  few calls after warm-up (compile excluded), ``block_until_ready``; ``decode_ms_per_token``: one greedy decode
  of that batch divided by its loop iterations (:meth:`Engine.time_batch`).
* FLOPs per question, analytic (:func:`jaxprune.flops.prefill_cost`, averaged over the questions' real text
  lengths; 1 multiply-add = 2 FLOPs):
  ``flops_llm_fastv_formula`` = FastV's ``L(4nd^2 + 2n^2d + 2ndm)`` (the papers' convention: LLM only, MACs);
  ``flops_llm_swiglu`` = what the decoder computes (GQA widths, 3-matrix SwiGLU, LM head on the last token);
  ``flops_total_swiglu`` = vision tower + projector + ``flops_llm_swiglu``.
* ``xla_flops_per_row``: ``compiled.cost_analysis()["flops"]`` of the jitted prefill actually run (vision tower
  included, at the padded length bucket, per device program divided by its rows); None ("n/a") where the backend
  does not report it (custom kernels report 0 or nothing).
* ``kv_cache_bytes``: static KV caches of one question (:func:`jaxprune.flops.kv_cache_bytes`, model dtype,
  ``prompt + max_new_tokens`` slots per segment).
* ``peak_memory_bytes`` + ``peak_memory_kind``: ``device.memory_stats()["peak_bytes_in_use"]`` (max over local
  devices; process-cumulative, so it includes earlier runs of a sweep) where the backend has it, else the host
  process' peak RSS (``"host_rss"``; CPU).
* ``compile``: seconds of lower + compile per program and shape (rows, length bucket, image).
"""

from __future__ import annotations

import resource
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax

from jaxprune.flops import kv_cache_bytes, prefill_cost


def analytic(cfg: Any, reducer: Any, text_lengths: Sequence[int], max_new_tokens: int, itemsize: int,
             images: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Mean per-question analytic FLOPs, visual tokens and KV bytes over questions with one image each
    (``text_lengths`` = prompt tokens other than image tokens; ``images`` = each question's (placeholder tokens,
    crops), which LLaVA-NeXT's cost depends on)."""
    if not text_lengths:
        return {}
    images = list(images) if images is not None else [(None, None)] * len(text_lengths)
    counts = Counter((int(t), k, c) for t, (k, c) in zip(text_lengths, images))
    n = sum(counts.values())
    acc: dict[str, float] = {"flops_vision": 0.0, "flops_projector": 0.0, "flops_llm_swiglu": 0.0,
                             "flops_llm_fastv_formula": 0.0, "flops_total_swiglu": 0.0, "kv_cache_bytes": 0.0}
    first = None
    for (t, k_img, crops), c in counts.items():
        cost = prefill_cost(cfg, reducer, text_tokens=t, images=1, batch=1, image_tokens=k_img, crops=crops)
        first = first or cost
        w = c / n
        acc["flops_vision"] += w * cost.vision
        acc["flops_projector"] += w * cost.projector
        acc["flops_llm_swiglu"] += w * cost.llm_swiglu
        acc["flops_llm_fastv_formula"] += w * cost.llm_fastv_formula
        acc["flops_total_swiglu"] += w * cost.total
        acc["kv_cache_bytes"] += w * kv_cache_bytes(cfg, cost, batch=1, new_tokens=max_new_tokens, itemsize=itemsize)
    out: dict[str, Any] = dict(acc)
    out["kv_cache_bytes"] = int(round(acc["kv_cache_bytes"]))
    out["visual_tokens"] = int(first.visual_tokens[0])                 # per image, entering the LLM
    out["visual_tokens_avg_layers"] = float(first.average_visual_tokens)  # averaged over decoder layers
    ks = [k for (_, k, _), c in counts.items() for _ in range(c) if k is not None]
    out["visual_tokens_full"] = (int(round(sum(ks) / len(ks))) if ks and cfg.model_type != "llava"
                                 else int(cfg.tokens_per_image))  # NeXT: the questions' mean HF count
    out["mean_text_tokens"] = sum(key[0] * c for key, c in counts.items()) / n
    return out


def peak_memory() -> tuple[int | None, str]:
    """(bytes, kind): device peak where the backend reports it, else host peak RSS."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device_peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host_rss"


def compile_records(compiled: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for c in compiled:
        rows, length, img = c.shape
        for kind, s in c.compile_s.items():
            out.append({"program": kind, "rows": rows, "seq_bucket": length, "image": img, "seconds": s})
    return out


def xla_per_row(compiled: Any, n_devices: int) -> float | None:
    """Per-question XLA FLOPs of a prefill executable: its per-device count over the rows one device holds."""
    if compiled is None or compiled.xla_flops is None:
        return None
    rows_per_device = max(1, compiled.shape[0] // max(1, n_devices))
    return compiled.xla_flops / rows_per_device


def device_description(mesh: Any = None) -> str:
    """E.g. ``8 x cpu:cpu over 1 process(es), jax 0.10.2`` for the devices of ``mesh`` (default: all)."""
    devs = list(mesh.devices.flat) if mesh is not None else jax.devices()
    d = devs[0]
    kind = getattr(d, "device_kind", "") or d.platform
    procs = len({x.process_index for x in devs})
    return f"{len(devs)} x {d.platform}:{kind} over {procs} process(es), jax {jax.__version__}"
