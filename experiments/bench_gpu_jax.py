"""The jaxprune side of :mod:`experiments.bench_gpu`: a worker that measures rows of one model.

A row = (model, batch, reducer, budget). The model is built once per worker with random weights initialised
on the device (:func:`jaxprune.sharding.random_model`: one jitted init program, nothing on the host) in the
benchmark dtype; inputs are the ``bench_forward`` / ``bench_next`` prompts (35 text tokens, one image, 40 text
tokens; NeXT: a square 672 px image, 5 crops). Each row runs exactly the jitted programs ``Llava.generate``
runs (``model.programs.prefill`` on the row's ``model.plan(...)``, then ``model.programs.decode``) and
records what :mod:`experiments.bench_gpu` documents (TTFT, decode, KV bytes, XLA-plan peak memory, analytic
FLOPs, per-layer sequence lengths). Results are appended to a JSON-lines file: ``{"start": key}`` before a row,
the row's record after it (with ``error`` if it failed), so a crash loses at most the row in flight.

    python -m experiments.bench_gpu_jax --plan PLAN.json --out ROWS.jsonl   # normally started by bench_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

from experiments.bench_common import timeit_paired
from experiments.bench_gpu_setup import PREFIX, QUESTION, device_peaks, model_config
from jaxprune.config import LlavaConfig


def reducer_spec(model: str, name: str, tokens: int, cfg: LlavaConfig, pool: int):
    """The registry spec; on NeXT, ADSC's schedule is solved over the image's packed pool (not 576)."""
    from jaxprune import reducers as R
    from jaxprune.reducers import registry

    if model == "next" and name == "adsc":
        return R.adsc_schedule(tokens, num_layers=cfg.text.num_hidden_layers, total=pool)
    return registry.make(name, tokens, cfg)


# ---------------------------------------------------------------------------------------------------
# jaxprune side (a worker: one model, many rows)
_ATTN = {"impl": None, "fallbacks": 0}


def route_attention(impl: str | None) -> None:
    """Send the model's main attention (Llama, CLIP) to ``dot_product_attention(implementation=impl)``; calls
    it refuses at trace time (dtype / shape / cuDNN version) fall back to XLA and are counted."""
    from jaxprune.models import attention as A
    from jaxprune.models import clip, llama

    base = A.attention
    _ATTN["impl"] = impl

    def routed(q, k, v, mask, implementation=None, causal=False):
        want = implementation or _ATTN["impl"]
        if want is None:
            return base(q, k, v, mask, causal=causal)
        try:  # causal (a prefill): cuDNN skips the blocks above the diagonal; the mask already hides them
            return base(q, k, v, mask, want, causal=causal)
        except (NotImplementedError, ValueError, RuntimeError):
            if causal:
                try:  # a cuDNN that refuses bias + causal: the same call without the causal hint
                    out = base(q, k, v, mask, want)
                    _ATTN["causal_refused"] = _ATTN.get("causal_refused", 0) + 1
                    return out
                except (NotImplementedError, ValueError, RuntimeError):
                    pass
            _ATTN["fallbacks"] += 1
            return base(q, k, v, mask, "xla")

    llama.attention = clip.attention = routed


def make_inputs(model: str, cfg: LlavaConfig, batch: int):
    from experiments import bench_forward, bench_next

    if model == "llava15":
        ids, mask, px = bench_forward.make_inputs(cfg, batch)
        return {"ids": ids, "mask": mask, "px": px, "sizes": None, "n_visual": cfg.tokens_per_image}
    ids, px, sizes, n = bench_next.make_inputs(cfg, batch)
    return {"ids": ids, "mask": None, "px": px, "sizes": sizes, "n_visual": n}


def prefill_call(model, spec, inp):
    """``(jitted fn, args, kwargs, text slots)``: ``fn(*args, **kwargs, max_new_tokens=n) -> DecodeState``, the
    exact program ``Llava.generate`` runs (text slots = non-visual slots of the sequence, bucket padding incl.)."""
    p = model.plan(inp["ids"], inp["px"], inp["mask"], inp["sizes"], spec)
    T = p.arrays["input_ids"].shape[1]
    lay = p.static.layout
    text = T - inp["n_visual"] if spec is None else T - lay.ipr * lay.S_h
    return model.programs.prefill, (model.params, p.arrays), {"static": p.static}, text


def analytic(cfg: LlavaConfig, spec, seqs: list[int], full_seq: int) -> dict:
    """Per-row prefill FLOPs (vision + projector, decoder at the real per-layer lengths incl. the selection work
    at in-LLM cuts, shallow prefill) and the weights one decode step must read besides the KV cache (decoder +
    LM head, in parameters)."""
    from experiments.bench_budgets import shallow_flops
    from jaxprune import flops
    from jaxprune.models.param_spec import param_shapes
    from jaxprune.reducers.options import unwrap

    t = cfg.text
    if cfg.model_type == "llava":
        pc = flops.prefill_cost(cfg, spec, text_tokens=PREFIX + QUESTION, images=1)
        cuts = getattr(pc, "llm_cuts", 0.0)  # selection work at in-LLM cuts (next-layer q/k), where counted
    else:  # every crop through the tower and the projector (the static program runs all of them)
        from jaxprune.processing_anyres import max_crops

        view = dataclasses.replace(cfg, model_type="llava", image_grid_pinpoints=())
        crops = max_crops(cfg.image_grid_pinpoints, cfg.vision.image_size)
        pc = flops.prefill_cost(view, None, text_tokens=PREFIX + QUESTION, images=crops)
        try:  # in-LLM selection work, on the LLaVA-1.5 view of the packed sequence (approximate)
            cuts = getattr(flops.prefill_cost(view, unwrap(spec)[0], text_tokens=PREFIX + QUESTION, images=crops),
                           "llm_cuts", 0.0) if spec is not None else 0.0
        except Exception:  # noqa: BLE001 - budgets the 1.5 view cannot express
            cuts = 0.0
    llm = sum(flops.llm_layer(cfg, s) for s in seqs) + 2 * t.hidden_size * t.vocab_size + cuts
    shallow = 0.0 if spec is None else shallow_flops(cfg, unwrap(spec)[0], full_seq, 1)
    w = sum(int(math.prod(s)) for k, s in param_shapes(cfg).items()
            if k.startswith(("language.layers", "language.norm", "lm_head"))
            or (t.tie_word_embeddings and k == "language.embed_tokens.embedding"))
    return {"flops_vision": pc.vision + pc.projector, "flops_llm": llm, "flops_cuts": cuts, "flops_shallow": shallow,
            "flops_per_row": pc.vision + pc.projector + llm + shallow, "decode_weight_params": w}


def jax_worker(settings: dict, rows: list[dict], out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from experiments.bench_common import timeit
    from jaxprune import sharding

    def emit(rec):
        with open(out, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    dev, dtype = jax.devices()[0], jnp.dtype(settings["dtype"])
    impl = settings["attention"]
    if impl == "auto":
        impl = "cudnn" if dev.platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "default"
    if impl != "default":
        route_attention(impl)
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    emit({"env": {"platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
                  "devices": jax.device_count(), "attention": impl, "dtype": str(dtype), "memory_stats": bool(stats),
                  **device_peaks(dev.platform, dev.device_kind)}})
    new, reps = settings["new_tokens"], settings["repeats"]
    models, inputs, full_prefill = {}, {}, {}
    for row in rows:
        emit({"start": row["key"]})
        rec, m = {"key": row["key"]}, row["model"]
        for attempt in ("first", "xla retry"):
            try:
                if m not in models:
                    models.clear()
                    full_prefill.clear()
                    cfg = model_config(m, settings["size"])
                    t0 = time.perf_counter()
                    models[m] = sharding.random_model(cfg, None, seed=0, dtype=dtype)  # initialised on device
                    jax.block_until_ready(models[m].params)
                    rec["init_s"] = time.perf_counter() - t0
                model, cfg = models[m], models[m].cfg
                if (m, row["batch"]) not in inputs:
                    inputs.clear()
                    full_prefill.clear()
                    inputs[(m, row["batch"])] = make_inputs(m, cfg, row["batch"])
                inp = inputs[(m, row["batch"])]
                spec = None if row["reducer"] == "full" else reducer_spec(m, row["reducer"], row["tokens"], cfg,
                                                                        inp["n_visual"])
                res = measure(model, spec, inp, new, reps, timeit, full_prefill.get((m, row["batch"])))
                if spec is None:
                    full_prefill[(m, row["batch"])] = res["prefill"]
                rec.update({k: v for k, v in res.items() if k != "prefill"})
                rec["spec"] = repr(spec)
                break
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                if _ATTN["impl"] != "cudnn" or attempt != "first":
                    break
                rec["cudnn_error"], _ATTN["impl"] = rec.pop("error"), "xla"  # retry this row on XLA attention
                jax.clear_caches()
        rec["attention"], _ATTN["impl"] = _ATTN["impl"] or "default", None if impl == "default" else impl
        if stats:  # lifetime peak of the device allocator (monotone over the worker)
            s = dev.memory_stats()
            rec["device_peak_bytes"], rec["device_in_use_bytes"] = s.get("peak_bytes_in_use"), s.get("bytes_in_use")
        else:  # CPU: the worker process's peak resident set (lifetime), labelled as such in the report
            rec["host_rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        emit(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "spec"}, default=str), flush=True)


def measure(model, spec, inp, new: int, repeats: int, timeit, baseline=None) -> dict:
    """One row's figures; ``baseline`` (the full model's prefill at this batch) makes the TTFT timing paired."""
    import jax

    from jaxprune import engine

    fn, args, kw, text_slots = prefill_call(model, spec, inp)
    fb = _ATTN["fallbacks"]
    t0 = time.perf_counter()
    state = jax.block_until_ready(fn(*args, **kw, max_new_tokens=new + 1))
    out = {"first_call_s": time.perf_counter() - t0}

    def prefill():
        return jax.block_until_ready(fn(*args, **kw, max_new_tokens=new + 1).first_logits)

    if baseline is None:
        out["ttft_s"] = timeit(prefill, repeats)
    else:  # interleaved with the full model's prefill: a speedup that machine-load drift cannot fake
        tf, tr = timeit_paired(baseline, prefill, repeats)
        out["ttft_s"], out["full_ttft_paired_s"] = statistics.median(tr), statistics.median(tf)
        out["paired_speedup"] = statistics.median(a / b for a, b in zip(tf, tr))
    out["prefill"] = prefill

    def dec(k):
        return lambda: jax.block_until_ready(engine.decode(model, state, k, eos_ids=(), pad_id=0))

    t1, tn = timeit(dec(1), repeats), timeit(dec(new + 1), repeats)
    B = int(args[1]["input_ids"].shape[0])
    seqs = [int(c.capacity) - (new + 1) for c in state.caches]
    out.update(seq=seqs[0], seqs=seqs, text_slots=int(text_slots), kv_bytes=int(state.kv_bytes),
               decode_s_per_tok=(tn - t1) / new, attention_fallbacks=_ATTN["fallbacks"] - fb,
               avg_visual_tokens=sum(s - text_slots for s in seqs) / len(seqs))
    out["tokens_per_s"] = B / out["decode_s_per_tok"] if out["decode_s_per_tok"] > 0 else None
    full_seq = int(inp["ids"].shape[1])
    out.update(analytic(model.cfg, spec, seqs, full_seq))
    out["flops_total"] = B * out["flops_per_row"]
    out["decode_bytes_per_step"] = out["decode_weight_params"] * model.dtype.itemsize + out["kv_bytes"]
    try:
        ma = fn.lower(*args, **kw, max_new_tokens=new + 1).compile().memory_analysis()
        out["plan_peak_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                                     - ma.alias_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - "an aid for manual inspection", may be missing on a backend
        out["plan_peak_bytes"] = None
        out["plan_peak_error"] = str(e)[:200]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="JSON {settings, rows} written by experiments.bench_gpu")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = ap.parse_args(argv)
    plan = json.loads(Path(a.plan).read_text())
    jax_worker(plan["settings"], plan["rows"], Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
