"""Speed at real size: LLaVA-1.5-7B and LLaVA-NeXT-7B shapes, jaxprune vs transformers, full and pruned.

**The target run needs a GPU** (one H100 / H200 / A100; random bf16 weights, nothing downloaded)::

    python -m experiments.bench_gpu --model both --batch 1 16        # -> experiments/results/gpu_<device>.md/.json

Shapes: CLIP-L/14-336 (24 x 1024, 16 heads, 576 patches) + 2-layer projector + Llama/Vicuna-7B (32 x 4096,
32 heads, MLP 11008, vocab 32064); NeXT adds the llava-v1.6 pinpoints (one square 672 px image: 5 crops,
2928 packed visual tokens). Prompt: 35 text tokens, the image, 40 text tokens. For the full model and for
VisionZip, VisionDrop, ConsensusDrop, AdaFV, ADSC and FastV at 192/128/64 visual tokens (NeXT: 640/320/160 of
2880; ``jaxprune.reducers.registry`` conventions: in-LLM multi-cut methods count the layer average, FastV keeps
``budget`` after layer 2), at batch 1 and 16, every row records:

* **TTFT** (ms): the jitted prefill to the first token's logits, vision tower included (median of ``repeats``);
* **decode** (ms/token): (decode loop of N+1 tokens - of 1 token) / N on one prefill state, EOS disabled;
  **tokens/s** = batch / decode time per token;
* **KV bytes**: ``DecodeState.kv_bytes`` of the real prefill (caches for N+1 new tokens);
* **peak memory**: the XLA plan of the prefill program (arguments + outputs + temporaries - aliases, i.e.
  weights + inputs + KV + activations; ``compiled.memory_analysis()``), and the device allocator's lifetime
  ``peak_bytes_in_use`` after the row (``memory_stats()``; monotone over a worker), or on CPU the worker's peak
  RSS (labelled "host RSS");
* **MFU** = analytic prefill FLOPs / TTFT / the device's bf16 dense peak. FLOPs: vision tower + projector
  (``jaxprune.flops.prefill_cost``; NeXT: 5 crops) + the decoder at the sequence lengths the model really ran
  (per layer, from the KV-cache capacities: bucket padding and in-LLM cuts included; SwiGLU, GQA, full T x T
  attention, LM head on the last token) + ConsensusDrop's shallow prefill;
* **decode bandwidth** = (decoder + LM-head weight bytes + whole KV cache bytes) per step / decode time, as a
  fraction of the device's HBM peak (every decode step reads all weights and every static cache slot);
* **FLOPs speedup** = FLOPs_full / FLOPs and **realized** = the median of TTFT_full / TTFT over pairs of runs
  interleaved with the full model's prefill (ABBA order: load drift on a shared machine cannot fake it; a
  reducer row's TTFT is the median of its paired runs); ratio = realized / FLOPs speedup;
* **transformers** (same device, dtype, shapes; :mod:`experiments.bench_gpu_torch`): TTFT and decode of
  ``Llava(Next)ForConditionalGeneration`` with SDPA, the full model on HF's own path, pruned rows as the whole
  vision tower + the LLM at the pruned length (text + kept visual tokens as ``inputs_embeds``; layer-averaged
  count for in-LLM methods); **ratio** = jaxprune / transformers (< 1: jaxprune faster).

Targets (GPU): TTFT <= 0.67 x transformers' at full tokens; realized speedup at 64 tokens >= 0.9 x the FLOPs
speedup; prefill MFU >= 50% at batch 16; decode >= 70% of HBM bandwidth at batch 1. Peaks (bf16 dense, no
sparsity) come from NVIDIA's datasheets (table ``PEAKS``); an unknown device gets n/a in those columns.

Precision: ``--dtype auto`` = bf16 weights and activations on GPU (norms and softmax in fp32, as the model
always does), fp32 on CPU (XLA:CPU and PyTorch CPU bf16 matmuls are emulated/slow, which would measure the
emulation). Attention: ``--attention auto`` routes the main attention (Llama and CLIP) through
``jax.nn.dot_product_attention(implementation='cudnn')`` (cuDNN flash; the boolean mask goes in as a bias)
on GPU with bf16/fp16 -- ``jaxprune.models.attention`` leaves ``implementation=None`` (= XLA) by default and
this script sets it; a call cuDNN refuses at trace time falls back to XLA (counted in the row), and a row
whose cuDNN program fails to compile is retried with XLA (recorded). CPU keeps the model's own CPU path.

Robustness: each side runs in its own subprocess per model (jaxprune, then transformers at the lengths
jaxprune ran): the frameworks never share device memory, and a crash (OOM) loses one row (rows are appended
to JSON-lines files; a crashed worker restarts on the rows left). Every row catches its own error; the report
(``.md`` + ``.json``) is rewritten after every phase. ``--inprocess`` runs both sides in this process (CPU, tests). Files: this one (orchestration),
``bench_gpu_setup.py`` (configs, peaks, prompt geometry), ``bench_gpu_jax.py`` (jaxprune worker), ``bench_gpu_torch.py`` (transformers worker),
``bench_gpu_report.py`` (derived figures, targets, markdown). The full GPU run is compile-bound (one prefill
and up to two decode programs per row, 76 rows): budget an hour or two; ``--model`` / ``--batch`` /
``--reducers`` split it.

CPU figures (built without a GPU): ``--size reduced`` (:func:`~experiments.bench_gpu_setup.reduced_config`, 576 visual tokens) ->
``experiments/results/gpu_cpu_reduced.md``, indicative only (shared machine). ``--tiny``: the smoke test.

    python -m experiments.bench_gpu [--model llava15|next|both] [--batch 1 16] [--budgets 192 128 64]
        [--next-budgets 640 320 160] [--reducers ...] [--size auto|full|reduced|tiny] [--tiny] [--dtype auto]
        [--attention auto|cudnn|xla|default] [--repeats 5] [--new-tokens 32] [--inprocess] [--no-torch] [--out STEM]
    python -m experiments.bench_gpu --render experiments/results/gpu_<device>.json   # re-render the .md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from experiments.bench_common import git_rev, machine
from experiments.bench_gpu_setup import (PEAKS, PINPOINTS, PREFIX, QUESTION, device_peaks,  # noqa: F401 (re-exported)
                                         llava15_7b, model_config, reduced_config, tiny_config)
from jaxprune.config import LlavaConfig

REDUCERS = ("visionzip", "visiondrop", "consensusdrop", "adafv", "adsc", "fastv")
BUDGETS = {"llava15": (192, 128, 64), "next": (640, 320, 160)}
FULL_TOKENS = {"llava15": 576, "next": 2880}  # the papers' "full" conventions the budgets are quoted against
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Configs and peaks: experiments.bench_gpu_setup (shared with the jaxprune worker)
def scaled_budgets(model: str, cfg: LlavaConfig, budgets) -> list[int]:
    """Budgets quoted against the 7B geometry (576 / 2880), moved to ``cfg``'s token count (identity at 336 px)."""
    full = cfg.tokens_per_image * (1 if model == "llava15" else 5)
    return [b if full == FULL_TOKENS[model] else max(2, round(b * full / FULL_TOKENS[model])) for b in budgets]


# ---------------------------------------------------------------------------------------------------
# Orchestration: per model, the jaxprune worker, then the transformers worker at the lengths jaxprune ran
def plan_rows(a) -> list[dict]:
    rows = []
    for m in (["llava15", "next"] if a.model == "both" else [a.model]):
        cfg, qb = model_config(m, a.size), (a.budgets if m == "llava15" else a.next_budgets)
        for batch in a.batch:
            rows.append({"key": f"{m}|b{batch}|full|{FULL_TOKENS[m]}", "model": m, "batch": batch,
                         "reducer": "full", "budget": FULL_TOKENS[m], "tokens": None})
            rows += [{"key": f"{m}|b{batch}|{n}|{q}", "model": m, "batch": batch, "reducer": n, "budget": q,
                      "tokens": t} for n in a.reducers for q, t in zip(qb, scaled_budgets(m, cfg, qb))]
    return rows


def _jsonl(path: Path) -> list[dict]:
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return out


def _settings(a) -> dict:
    return {k: getattr(a, k) for k in ("size", "dtype", "attention", "repeats", "new_tokens")}


def _worker(module: str, plan: Path, out: Path, log: list, name: str) -> None:
    env = dict(os.environ)  # a worker has the device to itself: let XLA take 90% (not 75%) of its memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    p = subprocess.run([sys.executable, "-m", module, "--plan", str(plan), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
    log.append({"worker": name, "rc": p.returncode, "stderr_tail": p.stderr[-1500:]})


def run_jax(a, rows: list[dict], work: Path, log: list, m: str) -> list[dict]:
    """In-process, or a worker restarted after a crash on the rows left (the row in flight is marked failed)."""
    out = work / f"jax_{m}.jsonl"
    for _ in range(len(rows) + 1):
        recs = _jsonl(out)
        done = {r["key"] for r in recs if "key" in r}
        left = [r for r in rows if r["key"] not in done]
        crashed = [r["start"] for r in recs if "start" in r and r["start"] not in done]
        if crashed:
            with open(out, "a") as f:
                f.write(json.dumps({"key": crashed[-1], "error": "worker crashed in this row: "
                                    + (log[-1]["stderr_tail"][-400:] if log else "")}) + "\n")
            continue
        if not left:
            break
        if a.inprocess:
            from experiments import bench_gpu_jax

            bench_gpu_jax.jax_worker(_settings(a), left, out)
            continue
        plan = work / f"jax_{m}_plan.json"
        plan.write_text(json.dumps({"settings": _settings(a), "rows": left}))
        n = len(_jsonl(out))
        _worker("experiments.bench_gpu_jax", plan, out, log, f"jax:{m}")
        if log[-1]["rc"] != 0 and len(_jsonl(out)) == n:  # died before any progress: do not loop
            break
    return _jsonl(out)


def torch_plan(a, m: str, rows: list[dict]) -> dict:
    """One transformers job per (batch, LLM visual count): the full model, and each distinct pruned count."""
    from jaxprune.processing_anyres import max_crops, num_image_tokens

    cfg, jobs = model_config(m, a.size), {}
    for r in rows:
        if "ttft_s" in r:
            vis = None if r["reducer"] == "full" else round(r["avg_visual_tokens"])
            r["torch_key"] = f"{m}|b{r['batch']}|v{'full' if vis is None else vis}"
            jobs.setdefault(r["torch_key"], {"key": r["torch_key"], "batch": r["batch"], "visual": vis})
    S = cfg.vision.image_size
    nxt = cfg.model_type == "llava_next"
    return {"config": cfg.to_hf_dict(), "dtype": a.dtype, "repeats": a.repeats, "new_tokens": a.new_tokens,
            "prefix": PREFIX, "question": QUESTION, "image_size_hw": [2 * S, 2 * S],
            "image_tokens": num_image_tokens((2 * S, 2 * S), cfg.image_grid_pinpoints, S, cfg.vision.patch_size)
            if nxt else cfg.tokens_per_image, "crops": max_crops(cfg.image_grid_pinpoints, S) if nxt else 1,
            "jobs": list(jobs.values())}


def run_torch(a, m: str, plan: dict, work: Path, log: list) -> list[dict]:
    pj, out = work / f"torch_{m}_plan.json", work / f"torch_{m}.jsonl"
    pj.write_text(json.dumps(plan))
    if a.inprocess:
        from experiments import bench_gpu_torch

        bench_gpu_torch.main(["--plan", str(pj), "--out", str(out)])
    else:
        _worker("experiments.bench_gpu_torch", pj, out, log, f"torch:{m}")
    recs = _jsonl(out)
    done = {r.get("key") for r in recs}
    recs += [{"key": j["key"], "error": "transformers worker died before this job: "
              + (log[-1]["stderr_tail"][-300:] if log and not a.inprocess else "")}
             for j in plan["jobs"] if j["key"] not in done]
    return recs


def _platform_hint() -> str:
    """'gpu' if nvidia-smi lists a GPU (checked without starting a JAX backend in this process), else 'cpu'."""
    if os.environ.get("JAX_PLATFORMS", "").lower().startswith("cpu"):
        return "cpu"
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
        return "gpu" if p.returncode == 0 and "GPU" in p.stdout else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("llava15", "next", "both"), default="both")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS["llava15"]), help="LLaVA-1.5 (of 576)")
    ap.add_argument("--next-budgets", type=int, nargs="+", default=list(BUDGETS["next"]), help="NeXT (of 2880)")
    ap.add_argument("--reducers", nargs="+", default=list(REDUCERS), help="registry names")
    ap.add_argument("--size", choices=("auto", "full", "reduced", "tiny"), default="auto",
                    help="auto: full (7B shapes) with a GPU, reduced without")
    ap.add_argument("--tiny", action="store_true", help="= --size tiny (smoke test; writes nothing without --out)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    ap.add_argument("--attention", choices=("auto", "cudnn", "xla", "default"), default="auto")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (5; tiny 1)")
    ap.add_argument("--new-tokens", type=int, default=None, help="N of the decode rate (32; reduced 16; tiny 2)")
    ap.add_argument("--inprocess", action="store_true", help="both sides in this process (no workers)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers side")
    ap.add_argument("--out", default=None, help="results stem (under experiments/results) or path")
    a = ap.parse_args(argv)
    a.platform_hint = _platform_hint()
    a.size = "tiny" if a.tiny else ("full" if a.platform_hint == "gpu" else "reduced") if a.size == "auto" else a.size
    a.repeats = a.repeats or {"full": 5, "reduced": 5, "tiny": 1}[a.size]
    a.new_tokens = a.new_tokens or {"full": 32, "reduced": 16, "tiny": 2}[a.size]
    a.dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.platform_hint == "gpu" else "float32")
    return a


def main(argv=None) -> dict:
    from experiments import bench_gpu_report as report

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # rewrite the .md (and derived .json fields) of a finished run
        path = Path(argv[1]).with_suffix(".json")
        data = json.loads(path.read_text())
        report.write(argparse.Namespace(out=str(path.with_suffix("")), size=data["settings"]["size"]), data)
        return data
    a = parse(argv)
    rows, work = plan_rows(a), Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    data = {"machine": machine(), "git": git_rev(), "command": "python -m experiments.bench_gpu " + " ".join(argv),
            "settings": _settings(a), "batches": a.batch, "work_dir": str(work),
            "reducers": a.reducers, "configs": {}, "workers": [], "env": {}, "rows": [], "torch": {}, "seconds": {}}
    print(f"bench_gpu: {len(rows)} rows ({a.size}, {a.dtype}); worker files in {work}", flush=True)
    for m in dict.fromkeys(r["model"] for r in rows):
        data["configs"][m] = model_config(m, a.size).to_hf_dict()
        t0, mine = time.perf_counter(), [r for r in rows if r["model"] == m]
        recs = run_jax(a, mine, work, data["workers"], m)
        data["env"].update({f"jax_{m}": r["env"] for r in recs if "env" in r})
        got = {r["key"]: r for r in recs if "key" in r}
        mine = [{**r, **got.get(r["key"], {"error": "not run"})} for r in mine]
        data["rows"] = [r for r in data["rows"] if r["model"] != m] + mine
        data["seconds"][f"jax_{m}"] = time.perf_counter() - t0
        report.write(a, data)
        if a.no_torch:
            continue
        t0 = time.perf_counter()
        try:
            trecs = run_torch(a, m, torch_plan(a, m, mine), work, data["workers"])
        except Exception as e:  # noqa: BLE001 - the jaxprune figures stay
            traceback.print_exc()
            trecs = [{"env": {"error": f"{type(e).__name__}: {e}"}}]
        data["env"].update({f"torch_{m}": r["env"] for r in trecs if "env" in r})
        data["torch"].update({r["key"]: r for r in trecs if "key" in r})
        data["seconds"][f"torch_{m}"] = time.perf_counter() - t0
        report.write(a, data)
    return data


if __name__ == "__main__":
    main()
