"""Speed at real size: LLaVA-1.5-7B and LLaVA-NeXT-7B shapes, jaxprune vs transformers, full and pruned.

**The target run needs a GPU** (one H100 / H200 / A100; random bf16 weights, nothing downloaded)::

    python -m experiments.bench_gpu --model both --batch 1 16        # -> experiments/results/gpu_<device>.md/.json

Shapes: CLIP-L/14-336 (24 x 1024, 16 heads, 576 patches) + 2-layer projector + Llama/Vicuna-7B (32 x 4096,
32 heads, MLP 11008, vocab 32064); NeXT adds the llava-v1.6 pinpoints (one square 672 px image: 5 crops,
2928 packed visual tokens). Prompt: 35 text tokens, the image, 40 text tokens. For the full model and for
VisionZip, VisionDrop, ConsensusDrop, AdaFV, ADSC and FastV at 192/128/64 visual tokens (NeXT: 640/320/160 of
2880; ``jaxprune.reducers.registry`` conventions: in-LLM multi-cut methods count the layer average, FastV keeps
``budget`` after layer 2), at batch 1 and 16, every row records:

* **TTFT** (ms): the prefill to the first token's logits, vision tower included, median [min-max] over ABBA rounds
  (:mod:`experiments.timing`; one warm-up call, compile timed apart: ``lower`` + ``compile`` of the row's
  programs, the timed calls run the compiled executables);
* **decode** (ms/token): the slope of a least-squares fit of the decode loop's time (one prefill state, EOS
  disabled) at several lengths (``--decode`` picks the rows that get one; a fit whose slope is not positive or
  whose medians do not grow is refused, never reported); **tokens/s** = batch / decode time per token;
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
* **FLOPs speedup** = FLOPs_full / FLOPs and **realized** = the median of the per-round ratios TTFT_full / TTFT
  with the full model's prefill timed in the same ABBA rounds; ratio = realized / FLOPs speedup (a realized
  speedup above the FLOPs limit is flagged: it means the full row ran a slower kernel per FLOP);
* **transformers** (same device, dtype, shapes; :mod:`experiments.bench_gpu_torch`): TTFT and decode of
  ``Llava(Next)ForConditionalGeneration`` with SDPA, the full model on HF's own path, pruned rows as the whole
  vision tower + the LLM at the pruned length (text + kept visual tokens as ``inputs_embeds``; layer-averaged
  count for in-LLM methods); **ratio** = jaxprune / transformers (< 1: jaxprune faster).

Pairing (``--pairing``): ``process`` (default on CPU) runs both frameworks in one worker process per model and
times them in the same ABBA rounds (:mod:`experiments.bench_gpu_pair`): the ratio is the median of per-round
ratios, robust to the load of a shared machine. ``workers`` (default on GPU) runs a jaxprune worker, then a
transformers worker (:mod:`experiments.bench_gpu_jax`, :mod:`experiments.bench_gpu_torch`): the frameworks never
share a process or device memory (cuDNN / CUDA library versions cannot clash), and a GPU has no shared load;
the ratio is then a ratio of medians.

Targets (GPU): TTFT <= 0.67 x transformers' at full tokens; realized speedup at 64 tokens >= 0.9 x the FLOPs
speedup; prefill MFU >= 50% at batch 16; decode >= 70% of HBM bandwidth at batch 1. Peaks (bf16 dense, no
sparsity) come from NVIDIA's datasheets (table ``PEAKS``); an unknown device gets n/a in those columns.

Precision: ``--dtype auto`` = bf16 weights and activations on GPU (norms and softmax in fp32, as the model
always does), fp32 on CPU (XLA:CPU and PyTorch CPU bf16 matmuls are emulated/slow, which would measure the
emulation). Attention: ``--attention auto`` routes the main attention (Llama and CLIP) through
``jax.nn.dot_product_attention(implementation='cudnn')`` (cuDNN flash; the boolean mask goes in as a bias; the
decoder's prefill also passes ``is_causal``) on GPU with bf16/fp16 -- ``jaxprune.models.attention`` leaves
``implementation=None`` (= XLA) by default and this script sets it; a call cuDNN refuses at trace time falls
back to XLA (counted in the row), and a row whose cuDNN program fails to compile is retried with XLA
(recorded). CPU keeps the model's own CPU path (``jaxprune.models.attention.attention_cpu``).

Robustness and time: every finished row is appended to a JSON-lines file as soon as it is measured (with
``--out-dir D`` those files and the report live in ``D``, so a run killed by a timeout still leaves its rows); a
crashed worker restarts on the rows left; the report (``.md`` + ``.json``) is rewritten after every phase.
``--deadline S`` gives the whole run S seconds: each model gets an equal share (time a model leaves unused
passes to the next), and a worker past its share records its remaining reducer rows as skipped instead of
starting them (full-model rows, which every target needs, always run).
``--decode full-b1`` times decode only where a target needs it; ``--reducer-batches`` limits the reducer rows
to some batches; ``--compile-cache DIR`` keeps XLA executables for a rerun. ``--inprocess`` runs the workers
in this process (CPU, tests). Files: this one (orchestration), ``bench_gpu_setup.py`` (configs, peaks, prompt
geometry), ``bench_gpu_jax.py`` / ``bench_gpu_torch.py`` (the two sides), ``bench_gpu_pair.py`` (both in one
process), ``bench_gpu_report.py`` (derived figures, targets, markdown).

The prepared device run (issue 19: about ten minutes of device time for everything, room for one rerun): the
rows that decide every target -- the full model at batch 1 and 16 (TTFT vs transformers, MFU at 16, decode
bandwidth at 1: the only decode fit) and two reducers (one pre-LLM, one in-LLM) at 64 / 160 tokens at batch 16
(realized vs FLOPs speedup) -- three ABBA rounds each, reducer rows dropped past a 300 s budget, rows and report
written to ``$OUT`` as they finish (6 files), XLA executables kept for a rerun on the same machine::

    PYTHONUNBUFFERED=1 python3 -m experiments.bench_gpu --model both --batch 1 16 --reducers visionzip fastv
        --budgets 64 --next-budgets 160 --reducer-batches 16 --decode full-b1 --repeats 3 --deadline 300
        --compile-cache /tmp/jp_xla_cache --out-dir $OUT                                       # (one line)

CPU figures (built without a GPU): ``--size reduced`` (:func:`~experiments.bench_gpu_setup.reduced_config`, 576
visual tokens) -> ``experiments/results/gpu_cpu_reduced.md``. ``--tiny``: the smoke test.

    python -m experiments.bench_gpu [--model llava15|next|both] [--batch 1 16] [--budgets 192 128 64]
        [--next-budgets 640 320 160] [--reducers ...] [--reducer-batches 16] [--size auto|full|reduced|tiny]
        [--tiny] [--dtype auto] [--attention auto|cudnn|xla|default] [--repeats 5] [--new-tokens 32]
        [--decode all|full|full-b1|none] [--pairing auto|process|workers] [--deadline S] [--out-dir D]
        [--compile-cache DIR] [--inprocess] [--no-torch] [--out STEM] [--wait-quiet MIN] [--note TEXT]
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

from experiments import timing as T
from experiments.bench_common import git_rev
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
            if a.reducer_batches is not None and batch not in a.reducer_batches:
                continue
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
    return {k: getattr(a, k) for k in ("size", "dtype", "attention", "repeats", "new_tokens", "decode",
                                         "decode_points", "pairing")}


def _worker(module: str, plan: Path, out: Path, log: list, name: str, env_extra: dict | None = None) -> None:
    """A worker subprocess; its stdout (progress) goes to ours as it comes, its stderr to a file (tail kept)."""
    env = dict(os.environ)  # a worker has the device to itself: let XLA take 90% (not 75%) of its memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    env.update(env_extra or {})
    err = plan.with_suffix(".stderr")
    t0 = time.perf_counter()
    with open(err, "w") as ferr:
        p = subprocess.run([sys.executable, "-u", "-m", module, "--plan", str(plan), "--out", str(out)], cwd=ROOT,
                           env=env, stdout=None, stderr=ferr, text=True, check=False)
    tail = err.read_text()[-1500:] if err.exists() else ""
    log.append({"worker": name, "rc": p.returncode, "seconds": time.perf_counter() - t0, "stderr_tail": tail})
    print(f"bench_gpu: worker {name} exit {p.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)


def _restarting(a, rows: list[dict], out: Path, log: list, run_once) -> list[dict]:
    """Run ``run_once(left_rows)`` until every row has a record; a worker that died inside a row (its ``start``
    line without a record) gets that row marked failed and is restarted on the rows left."""
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
        n = len(_jsonl(out))
        run_once(left)
        if not a.inprocess and log and log[-1]["rc"] != 0 and len(_jsonl(out)) == n:  # died before any progress
            break
    return _jsonl(out)


def run_jax(a, rows: list[dict], work: Path, log: list, m: str, deadline: float | None = None) -> list[dict]:
    """The jaxprune worker (``--pairing workers``), in-process or restarted after a crash on the rows left."""
    out = _out_dir(a, work) / f"jax_{m}.jsonl"

    def once(left):
        if a.inprocess:
            from experiments import bench_gpu_jax

            bench_gpu_jax.jax_worker(_settings(a), left, out, deadline)
            return
        plan = work / f"jax_{m}_plan.json"
        plan.write_text(json.dumps({"settings": _settings(a), "rows": left, "deadline": deadline}))
        _worker("experiments.bench_gpu_jax", plan, out, log, f"jax:{m}", _cache_env(a))

    return _restarting(a, rows, out, log, once)


def run_pair(a, rows: list[dict], work: Path, log: list, m: str, deadline: float | None = None) -> list[dict]:
    """The paired worker (``--pairing process``): both frameworks in one process, the same ABBA rounds."""
    out = _out_dir(a, work) / f"pair_{m}.jsonl"
    tplan = torch_base_plan(a, m)

    def once(left):
        if a.inprocess:
            from experiments import bench_gpu_pair

            bench_gpu_pair.pair_worker(_settings(a), left, tplan, out, deadline)
            return
        plan = work / f"pair_{m}_plan.json"
        plan.write_text(json.dumps({"settings": _settings(a), "rows": left, "torch": tplan, "deadline": deadline}))
        _worker("experiments.bench_gpu_pair", plan, out, log, f"pair:{m}", _cache_env(a))

    return _restarting(a, rows, out, log, once)


def torch_base_plan(a, m: str) -> dict:
    from jaxprune.processing_anyres import max_crops, num_image_tokens

    cfg = model_config(m, a.size)
    S = cfg.vision.image_size
    nxt = cfg.model_type == "llava_next"
    return {"config": cfg.to_hf_dict(), "dtype": a.dtype, "repeats": a.repeats, "new_tokens": a.new_tokens,
            "prefix": PREFIX, "question": QUESTION, "image_size_hw": [2 * S, 2 * S],
            "image_tokens": num_image_tokens((2 * S, 2 * S), cfg.image_grid_pinpoints, S, cfg.vision.patch_size)
            if nxt else cfg.tokens_per_image, "crops": max_crops(cfg.image_grid_pinpoints, S) if nxt else 1,
            "jobs": []}


def torch_plan(a, m: str, rows: list[dict]) -> dict:
    """One transformers job per (batch, LLM visual count): the full model, and each distinct pruned count; a job
    gets the decode lengths of its rows (``--decode``)."""
    plan, jobs = torch_base_plan(a, m), {}
    for r in rows:
        if "ttft_s" in r:
            vis = None if r["reducer"] == "full" else round(r["avg_visual_tokens"])
            r["torch_key"] = f"{m}|b{r['batch']}|v{'full' if vis is None else vis}"
            j = jobs.setdefault(r["torch_key"], {"key": r["torch_key"], "batch": r["batch"], "visual": vis,
                                                 "lengths": []})
            j["lengths"] = sorted(set(j["lengths"]) | set(r.get("decode_lengths") or []))
    plan["jobs"] = list(jobs.values())
    return plan


def run_torch(a, m: str, plan: dict, work: Path, log: list, deadline: float | None = None) -> list[dict]:
    pj, out = work / f"torch_{m}_plan.json", _out_dir(a, work) / f"torch_{m}.jsonl"
    plan = dict(plan, deadline=deadline)
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


def _out_dir(a, work: Path) -> Path:
    d = Path(a.out_dir) if a.out_dir else work
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cache_env(a) -> dict:
    return {"JAXPRUNE_BENCH_COMPILE_CACHE": a.compile_cache} if a.compile_cache else {}


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
    ap.add_argument("--reducer-batches", type=int, nargs="+", default=None,
                    help="batches that get reducer rows (default: every --batch); full rows run at every batch")
    ap.add_argument("--size", choices=("auto", "full", "reduced", "tiny"), default="auto",
                    help="auto: full (7B shapes) with a GPU, reduced without")
    ap.add_argument("--tiny", action="store_true", help="= --size tiny (smoke test; writes nothing without --out)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    ap.add_argument("--attention", choices=("auto", "cudnn", "xla", "default"), default="auto")
    ap.add_argument("--repeats", type=int, default=None, help="timed ABBA rounds per figure (5; tiny 3)")
    ap.add_argument("--new-tokens", type=int, default=None, help="longest decode is N+1 tokens (32; reduced 16; tiny 4)")
    ap.add_argument("--decode", choices=("all", "full", "full-b1", "none"), default="all",
                    help="rows whose decode is timed: all, full-model rows, full-model rows at batch 1, none")
    ap.add_argument("--decode-points", type=int, default=3, help="generation lengths of each decode fit")
    ap.add_argument("--pairing", choices=("auto", "process", "workers"), default="auto",
                    help="auto: process (both frameworks in one worker, same ABBA rounds) on CPU, workers on GPU")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run (reducer rows past a model's share: skipped)")
    ap.add_argument("--out-dir", default=None, help="directory for the row files and the report (e.g. $OUT)")
    ap.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache directory")
    ap.add_argument("--inprocess", action="store_true", help="workers in this process (no subprocesses)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers side")
    ap.add_argument("--out", default=None, help="results stem (under experiments/results) or path")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the report (repeatable)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    a.platform_hint = _platform_hint()
    a.size = "tiny" if a.tiny else ("full" if a.platform_hint == "gpu" else "reduced") if a.size == "auto" else a.size
    a.repeats = a.repeats or {"full": 5, "reduced": 5, "tiny": 3}[a.size]
    a.new_tokens = a.new_tokens or {"full": 32, "reduced": 16, "tiny": 4}[a.size]
    a.dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.platform_hint == "gpu" else "float32")
    if a.pairing == "auto":
        a.pairing = "workers" if a.platform_hint == "gpu" else "process"
    if a.no_torch:
        a.pairing = "workers"
    return a


def main(argv=None) -> dict:
    from experiments import bench_gpu_report as report

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # rewrite the .md (and derived .json fields) of a finished run
        path = Path(argv[1]).with_suffix(".json")
        data = json.loads(path.read_text())
        report.write(argparse.Namespace(out=str(path.with_suffix("")), size=data["settings"]["size"], out_dir=None),
                     data)
        return data
    a = parse(argv)
    t_start = time.time()
    rows, work = plan_rows(a), Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    quiet = T.quiet_from_cli(a)
    data = {"git": git_rev(), "command": "python -m experiments.bench_gpu " + " ".join(T.shorten_notes(argv)),
            "settings": _settings(a), "batches": a.batch, "work_dir": str(work), "quiet": quiet, "notes": a.note,
            "reducers": a.reducers, "configs": {}, "workers": [], "env": {}, "rows": [], "torch": {}, "seconds": {},
            "host": T.environment()}
    data["machine"] = T.describe_machine(data["host"])
    models = list(dict.fromkeys(r["model"] for r in rows))
    print(f"bench_gpu: {len(rows)} rows ({a.size}, {a.dtype}, pairing {a.pairing}, decode {a.decode}); worker files in "
          f"{_out_dir(a, work)}", flush=True)
    monitor = T.LoadMonitor().__enter__()
    for i, m in enumerate(models):
        slot_end = None if a.deadline is None else t_start + a.deadline * (i + 1) / len(models)
        data["configs"][m] = model_config(m, a.size).to_hf_dict()
        t0, mine = time.perf_counter(), [r for r in rows if r["model"] == m]
        if a.pairing == "process":
            recs = run_pair(a, mine, work, data["workers"], m, slot_end)
            for r in recs:
                if "torch_env" in r:
                    data["env"][f"torch_{m}"] = r["torch_env"]
                if "torch_record" in r:
                    data["torch"][r["torch_record"]["key"]] = r["torch_record"]
        else:
            jax_end = None if slot_end is None else time.time() + 0.75 * (slot_end - time.time())
            recs = run_jax(a, mine, work, data["workers"], m, jax_end)
        data["env"].update({f"jax_{m}": r["env"] for r in recs if "env" in r})
        got = {r["key"]: r for r in recs if "key" in r}
        mine = [{**r, **got.get(r["key"], {"error": "not run"})} for r in mine]
        data["rows"] = [r for r in data["rows"] if r["model"] != m] + mine
        data["seconds"][f"{'pair' if a.pairing == 'process' else 'jax'}_{m}"] = time.perf_counter() - t0
        data["load"] = monitor.to_dict()
        report.write(a, data, final=False)
        if a.no_torch or a.pairing == "process":
            continue
        t0 = time.perf_counter()
        try:
            trecs = run_torch(a, m, torch_plan(a, m, mine), work, data["workers"], slot_end)
        except Exception as e:  # noqa: BLE001 - the jaxprune figures stay
            traceback.print_exc()
            trecs = [{"env": {"error": f"{type(e).__name__}: {e}"}}]
        data["env"].update({f"torch_{m}": r["env"] for r in trecs if "env" in r})
        data["torch"].update({r["key"]: r for r in trecs if "key" in r})
        data["seconds"][f"torch_{m}"] = time.perf_counter() - t0
        data["load"] = monitor.to_dict()
        report.write(a, data, final=False)
    data["load"] = monitor.stop()
    data["seconds"]["total"] = time.time() - t_start
    report.write(a, data)
    return data


if __name__ == "__main__":
    main()
