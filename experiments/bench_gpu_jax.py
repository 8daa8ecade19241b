"""The jaxprune side of :mod:`experiments.bench_gpu`: prepared rows (blocking callables + static facts) and a
worker that measures them alone.

A row = (model, batch, reducer, budget). The model is built once per process with random weights initialised on
the device (:func:`jaxprune.sharding.random_model` with ``init="per_shape"``: one small jitted program per distinct
parameter shape, nothing on the host; the single-program init took 9+ minutes to compile at 7B on an H200) in the
benchmark dtype; inputs are the ``bench_forward`` / ``bench_next`` prompts (35 text tokens, one image, 40 text tokens; NeXT:
a square 672 px image, 5 crops). :meth:`JaxSide.prepare` compiles the row's programs ahead of time
(``model.programs.prefill`` on the row's ``model.plan(...)``, and ``model.programs.decode`` at each decode
length: exactly what ``Llava.generate`` runs), timing ``lower`` and ``compile`` apart and reading the XLA cost
and memory analysis of the prefill; the timed callables call those compiled executables (no compile, no
dispatch-cache lookup in a timed call). :func:`measure_alone` times them with :mod:`experiments.timing` (the
full model's prefill in the same ABBA rounds as a reducer row's). :mod:`experiments.bench_gpu_pair` times them in
the same rounds as the transformers side instead.

    python -m experiments.bench_gpu_jax --plan PLAN.json --out ROWS.jsonl   # normally started by bench_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path

from experiments import timing as T
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


def lengths_for(settings: dict, row: dict) -> list[int]:
    """Decode lengths of a row (none when the plan's ``decode`` setting skips its decode)."""
    mode = settings.get("decode", "all")
    if mode == "none" or (mode == "full" and row["reducer"] != "full") or (
            mode == "full-b1" and (row["reducer"] != "full" or row["batch"] != 1)):
        return []
    return T.decode_lengths(settings["new_tokens"], settings.get("decode_points", 3))


class JaxSide:
    """One process's jaxprune side: the device, the dtype, the attention routing, one model at a time."""

    def __init__(self, settings: dict, emit=None):
        import jax
        import jax.numpy as jnp

        self.settings, self.jax = settings, jax
        cache = os.environ.get("JAXPRUNE_BENCH_COMPILE_CACHE")
        if cache:  # XLA executables kept on disk: a rerun on the same machine skips its compiles
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.dev, self.dtype = jax.devices()[0], jnp.dtype(settings["dtype"])
        impl = settings["attention"]
        if impl == "auto":
            impl = "cudnn" if self.dev.platform == "gpu" and self.dtype in (jnp.bfloat16, jnp.float16) else "default"
        self.impl = impl
        if impl != "default":
            route_attention(impl)
        self.stats = self.dev.memory_stats() if hasattr(self.dev, "memory_stats") else None
        self.env = {"platform": self.dev.platform, "device_kind": self.dev.device_kind, "jax": jax.__version__,
                    "devices": jax.device_count(), "attention": impl, "dtype": str(self.dtype),
                    "memory_stats": bool(self.stats), **device_peaks(self.dev.platform, self.dev.device_kind)}
        self.models, self.inputs = {}, {}
        if emit:
            emit({"env": self.env})

    def model(self, m: str, rec: dict):
        from jaxprune import sharding

        if m not in self.models:
            self.models.clear()
            self.inputs.clear()
            cfg = model_config(m, self.settings["size"])
            t0 = time.perf_counter()
            self.models[m] = sharding.random_model(cfg, None, seed=0, dtype=self.dtype, init="per_shape")  # on device, one small program per shape
            self.jax.block_until_ready(self.models[m].params)
            rec["init_s"] = time.perf_counter() - t0
        return self.models[m]

    def prepare(self, row: dict, rec: dict) -> dict:
        """Compile the row's programs; returns ``{"ttft": fn, "decode": {n: fn}, "meta": {...}}``."""
        jax = self.jax
        m = row["model"]
        model = self.model(m, rec)
        cfg = model.cfg
        if (m, row["batch"]) not in self.inputs:
            self.inputs.clear()
            self.inputs[(m, row["batch"])] = make_inputs(m, cfg, row["batch"])
        inp = self.inputs[(m, row["batch"])]
        spec = None if row["reducer"] == "full" else reducer_spec(m, row["reducer"], row["tokens"], cfg,
                                                                inp["n_visual"])
        fn, args, kw, text_slots = prefill_call(model, spec, inp)
        new = self.settings["new_tokens"]
        lengths = lengths_for(self.settings, row)
        fb = _ATTN["fallbacks"]
        comp = T.compile_seconds(fn, *args, **kw, max_new_tokens=new + 1)
        exe = comp["compiled"]
        meta = {"spec": repr(spec), "prefill_lower_s": comp["lower_s"], "prefill_compile_s": comp["compile_s"],
                **{f"prefill_{k}": v for k, v in T.xla_analysis(exe).items()}}
        meta["plan_peak_bytes"] = meta.pop("prefill_plan_peak_bytes")
        state = jax.block_until_ready(exe(*args))

        def ttft():
            jax.block_until_ready(exe(*args).first_logits)

        decode, dcomp = {}, {}
        for n in lengths:
            c = T.compile_seconds(model.programs.decode, model.params, state, max_new_tokens=n, eos_ids=(), pad_id=0)
            dcomp[n] = c["compile_s"] + c["lower_s"]
            decode[n] = lambda e=c["compiled"]: jax.block_until_ready(e(model.params, state))
        B = int(args[1]["input_ids"].shape[0])
        seqs = [int(c.capacity) - (new + 1) for c in state.caches]
        meta.update(seq=seqs[0], seqs=seqs, text_slots=int(text_slots), kv_bytes=int(state.kv_bytes),
                    attention_fallbacks=_ATTN["fallbacks"] - fb, decode_compile_s=dcomp, decode_lengths=lengths,
                    avg_visual_tokens=sum(s - text_slots for s in seqs) / len(seqs), batch_rows=B)
        meta.update(analytic(cfg, spec, seqs, int(inp["ids"].shape[1])))
        meta["flops_total"] = B * meta["flops_per_row"]
        meta["decode_bytes_per_step"] = meta["decode_weight_params"] * model.dtype.itemsize + meta["kv_bytes"]
        return {"ttft": ttft, "decode": decode, "meta": meta}

    def memory(self) -> dict:
        if self.stats:  # lifetime peak of the device allocator (monotone over the process)
            s = self.dev.memory_stats()
            return {"device_peak_bytes": s.get("peak_bytes_in_use"), "device_in_use_bytes": s.get("bytes_in_use")}
        return {"host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # CPU: peak RSS

    def attention_label(self) -> str:
        return _ATTN["impl"] or "default"

    def after_error(self, attempt: str, rec: dict) -> bool:
        """After a failed row: retry it once on XLA attention if cuDNN was in use (True = retry)."""
        if _ATTN["impl"] != "cudnn" or attempt != "first":
            return False
        rec["cudnn_error"], _ATTN["impl"] = rec.pop("error"), "xla"
        self.jax.clear_caches()
        return True

    def reset_attention(self) -> None:
        _ATTN["impl"] = None if self.impl == "default" else self.impl


def fill_decode(rec: dict, prefix: str, res, lengths, key=lambda n: n) -> None:
    """Decode fit of ``res`` (an :class:`experiments.timing.Interleaved`) into ``rec`` under ``prefix``."""
    if not lengths:
        rec[f"{prefix}decode_s_per_tok"], rec[f"{prefix}decode_fit"] = None, None
        return
    fit = T.fit_decode({n: res[key(n)].samples for n in lengths})
    rec[f"{prefix}decode_fit"] = fit.to_dict()
    rec[f"{prefix}decode_s_per_tok"] = fit.per_token_s
    rec[f"{prefix}decode_first_s"] = {n: res[key(n)].first_s for n in lengths}


def measure_alone(prep: dict, repeats: int, baseline=None) -> dict:
    """Time a prepared row alone (``baseline``: the full model's prefill, timed in the same ABBA rounds)."""
    fns = {"ttft": prep["ttft"]}
    if baseline is not None:
        fns["full"] = baseline
    fns.update({("decode", n): f for n, f in prep["decode"].items()})
    res = T.interleaved(fns, repeats)
    rec = {"ttft_s": res["ttft"].median, "ttft": res["ttft"].to_dict(), "first_call_s": res["ttft"].first_s}
    if baseline is not None:
        sp = res.ratio("full", "ttft")
        rec.update(paired_speedup=sp.median, paired_speedup_stats=sp.to_dict(),
                   full_ttft_paired_s=res["full"].median)
    fill_decode(rec, "", res, list(prep["decode"]), key=lambda n: ("decode", n))
    dec = rec["decode_s_per_tok"]
    rec["tokens_per_s"] = prep["meta"]["batch_rows"] / dec if dec else None
    return rec


def run_rows(side, rows: list[dict], emit, measure_row, deadline: float | None = None) -> None:
    """The row loop shared by the workers: ``{"start": key}`` before a row, its record after (with ``error`` if it
    failed, one XLA-attention retry after a cuDNN failure); reducer rows past ``deadline`` (``time.time()``) are
    recorded as skipped (full-model rows, which every target needs, always run)."""
    for row in rows:
        if deadline is not None and time.time() > deadline and row["reducer"] != "full":  # full rows always run
            emit({"key": row["key"], "skipped": "time budget (--deadline) spent before this row"})
            continue
        emit({"start": row["key"]})
        rec = {"key": row["key"]}
        for attempt in ("first", "xla retry"):
            try:
                rec.update(measure_row(row, rec))
                rec.pop("error", None)
                break
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                if not side.after_error(attempt, rec):
                    break
        rec["attention"] = side.attention_label()
        side.reset_attention()
        rec.update(side.memory())
        emit(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("spec", "ttft", "decode_fit", "ttft_vs_hf_stats")},
                         default=str)[:600], flush=True)


def emitter(out: Path):
    def emit(rec):
        with open(out, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
    return emit


def jax_worker(settings: dict, rows: list[dict], out: Path, deadline: float | None = None) -> None:
    """Measure ``rows`` alone (the transformers side runs in its own process: :mod:`experiments.bench_gpu_torch`)."""
    emit = emitter(out)
    side = JaxSide(settings, emit)
    full = {}

    def measure_row(row, rec):
        prep = side.prepare(row, rec)
        key = (row["model"], row["batch"])
        r = measure_alone(prep, settings["repeats"], None if row["reducer"] == "full" else full.get(key))
        if row["reducer"] == "full":
            full.clear()
            full[key] = prep["ttft"]
        return {**prep["meta"], **r}

    run_rows(side, rows, emit, measure_row, deadline)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="JSON {settings, rows} written by experiments.bench_gpu")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = ap.parse_args(argv)
    plan = json.loads(Path(a.plan).read_text())
    jax_worker(plan["settings"], plan["rows"], Path(a.out), plan.get("deadline"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
