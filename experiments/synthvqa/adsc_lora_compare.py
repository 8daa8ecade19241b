"""ADSC with LoRA fine-tuning vs training-free ADSC on the synthetic VQA set, at the two smallest budgets, 3 seeds.

    python -m experiments.synthvqa.adsc_lora_compare [--model jaxprune/eval/synthvqa/checkpoint] [--budgets 16 8]
        [--seeds 0 1 2] [--steps 200] [--train-images 1000] [--test-images 200] [--work DIR]
        [--out experiments/results/synthvqa_adsc_lora]

For every seed ``s`` and budget ``b`` (144-token model: 16 and 8 = the 64 / 32 of LLaVA-1.5's 576):

1. **training-free ADSC**: the base model with the ADSC schedule of ``b``;
2. **LoRA-ADSC**: fresh adapters (seed ``s``) fine-tuned on the synthvqa *train* split of seed ``s``
   (:func:`jaxprune.eval.synthvqa.export.write_instructions`, one question per record) with the reverse curriculum
   ending at ``b`` (:mod:`experiments.train.adsc_lora`), merged into the base weights, then the same schedule;
3. both scored on the *test* split of seed ``s`` (:func:`~jaxprune.eval.synthvqa.export.write_benchmark`) through the
   evaluation harness (``jaxprune.eval.runner.run_benchmark``: vicuna_v1 prompts, the model's image
   preprocessing, greedy decoding, the :mod:`jaxprune.eval.benchmarks.synthvqa` exact-match scorer) -- the very
   path of ``jaxprune-eval``; the full model is scored once per seed as the reference.

Budgets follow :mod:`experiments.train.curriculum` (``--budget-kind auto``: the registry's per-layer average when
every budget is reachable, else the tokens left after the last cut -- the 4-layer synthvqa decoder cannot average
16 tokens). Report: per-seed accuracies, mean +- sample std over seeds, the paired margin (LoRA - training-free,
same test questions) with its std and a t 95% interval, and the binomial standard error of one accuracy (the
test-set noise inside a seed). ``--work DIR`` keeps the data, adapters and answers, and makes a rerun resume
(adapters trained with identical settings are reloaded, finished evaluations are skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.eval.builtin import SHIPPED_CHECKPOINT

DEFAULT_MODEL = SHIPPED_CHECKPOINT
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "synthvqa_adsc_lora"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict[str, Any]:
    a = np.asarray(xs, float)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    half = T_975.get(len(a) - 1, 1.96) * sd / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "std": sd, "min": float(a.min()), "max": float(a.max()), "ci95": half,
            "values": [float(x) for x in a]}


def binomial_se(acc_pct: float, n: int) -> float:
    p = acc_pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.synthvqa.adsc_lora_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint dir with tokenizer")
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-images", type=int, default=1000, help="train-split images per seed (~3.7 questions each)")
    ap.add_argument("--test-images", type=int, default=200, help="test-split images per seed (~3.7 questions each)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--curriculum", default="reverse", help="preset or spec (experiments.train.curriculum)")
    ap.add_argument("--budget-kind", default="auto", choices=("average", "final", "auto"))
    ap.add_argument("--layers", type=lambda t: tuple(int(x) for x in t.split(",")), help="ADSC cut layers")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--work", type=Path, help="folder for data / adapters / answers (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results path without suffix (.md and .json)")
    a = ap.parse_args(argv)
    if a.work is None:
        with tempfile.TemporaryDirectory(prefix="adsc-lora-") as d:
            return run(a, Path(d))
    a.work.mkdir(parents=True, exist_ok=True)
    return run(a, a.work)


def run(a, work: Path) -> int:
    import jax

    import jaxprune as jp
    from jaxprune.eval.benchmarks import get_benchmark
    from jaxprune.eval import distributed as dist
    from jaxprune.eval.config import ReducerSpec
    from jaxprune.eval.runner import Context, RunOptions, run_benchmark
    from jaxprune.eval.sweep import load_tokenizer
    from jaxprune.eval.synthvqa import export
    from experiments.train import curriculum as cur
    from experiments.train.adsc_lora import TrainSettings, build_dataset, image_config, optimizer, train
    from experiments.train.batches import read_llava_instructions
    from experiments.train.reduced import LoraTrainer
    from jaxprune.lora import LoraConfig, apply_lora, load_adapters, read_adapter_metadata, save_adapters
    from jaxprune.reducers import registry

    t_start = time.perf_counter()
    model = jp.load(a.model)
    cfg = model.cfg
    tok = load_tokenizer(a.model)
    L, N = cfg.text.num_hidden_layers, cfg.tokens_per_image
    settings = {b: TrainSettings(target=b, curriculum=a.curriculum, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                 budget_kind=a.budget_kind, layers=a.layers) for b in a.budgets}
    all_budgets = sorted({p.budget for b in a.budgets for p in cur.parse_curriculum(a.curriculum, b)} | set(a.budgets))
    kind = cur.resolve_kind(a.budget_kind, all_budgets, L, N, a.layers)
    settings = {b: TrainSettings(**{**s.__dict__, "budget_kind": kind}) for b, s in settings.items()}
    name = f"adsc_{kind}" + ("" if a.layers is None else "_l" + "-".join(map(str, a.layers)))
    registry.register(name, lambda b, c: cur.adsc_reducer(b, c.text.num_hidden_layers, c.tokens_per_image, kind,
                                                          a.layers))
    schedules = {b: cur.describe(cur.adsc_reducer(b, L, N, kind, a.layers), L, N) for b in a.budgets}
    _log(f"model {a.model}: {L} decoder layers, {N} visual tokens; budgets {a.budgets} as '{kind}': {schedules}")

    ctx = Context.create(model, tok, str(a.model), model_dir=a.model)
    base_params = ctx.params
    img_cfg = image_config(a.model, cfg)
    bench = get_benchmark("synthvqa")
    lcfg = LoraConfig(rank=a.rank, alpha=a.alpha)
    opt, _ = optimizer(settings[a.budgets[0]])
    trainer = LoraTrainer(model, lcfg, opt, mesh=ctx.mesh)  # shared: each (shape, budget) compiles once
    merge = jax.jit(lambda p, ad: apply_lora(p, ad, lcfg))
    opts = RunOptions(batch_size=a.eval_batch, max_new_tokens=a.max_new_tokens, progress=False, timing_reps=1)

    def evaluate(questions, spec, run_dir, model_id):
        ctx.model_id = model_id
        res = run_benchmark(ctx, bench, questions, spec, run_dir, opts)
        sc = res.record["score"]
        return {"accuracy": sc["accuracy"], "n": sc["n"], "per_type": sc["per_type"], "chance": sc["chance"]}

    records: list[dict[str, Any]] = []
    for seed in a.seeds:
        test_dir = work / f"test_s{seed}_n{a.test_images}"
        if not (test_dir / export.META_FILE).is_file():
            export.write_benchmark(test_dir, "test", seed, n_images=a.test_images, overwrite=True)
        questions = bench.load(test_dir)
        train_dir = work / f"train_s{seed}_n{a.train_images}"
        train_json = train_dir / export.instructions_file("train")
        if not train_json.is_file():
            train_json = export.write_instructions(train_dir, "train", seed, a.train_images, overwrite=True)
        ds = build_dataset(read_llava_instructions(train_json), train_json.parent, tok, cfg, 2048, 32)
        _log(f"seed {seed}: {len(questions)} test questions, {len(ds.ids)} training rows (length {ds.length})")
        base_id = f"{a.model.name}"
        edir = work / "eval" / test_dir.name
        full = evaluate(questions, ReducerSpec("full"), edir / "full", base_id)
        _log(f"seed {seed}: full model {full['accuracy']:.1f}%")
        for b in a.budgets:
            spec = ReducerSpec(name, b)
            tf = evaluate(questions, spec, edir / f"tf_{name}_{b}", base_id)
            s = TrainSettings(**{**settings[b].__dict__, "seed": seed})
            want_meta = {"settings": json.loads(json.dumps(s.__dict__)), "train_json": str(train_json),
                         "model": str(a.model), "lora": lcfg.to_json()}
            tag = hashlib.sha1(json.dumps(want_meta, sort_keys=True).encode()).hexdigest()[:10]
            ad_dir = work / "adapters" / f"s{seed}_b{b}_{tag}"
            info = None
            if ad_dir.is_dir() and all(read_adapter_metadata(ad_dir)["metadata"].get(k) == v
                                       for k, v in want_meta.items()):
                adapters, _ = load_adapters(ad_dir)
                info = read_adapter_metadata(ad_dir)["metadata"]["info"]
                _log(f"seed {seed} budget {b}: reusing adapters {ad_dir}")
            else:
                ctx.model.params = base_params
                adapters, info = train(ctx.model, tok, ds, img_cfg, lcfg, s, trainer,
                                       log=lambda m, p=f"seed {seed} budget {b}: ": _log(p + m))
                save_adapters(ad_dir, adapters, lcfg, overwrite=True, metadata={**want_meta, "info": info})
            merged = dist.replicate(merge(base_params, adapters), ctx.mesh)
            ctx.params = ctx.model.params = merged
            try:
                lora = evaluate(questions, spec, edir / f"lora_{name}_{b}_{tag}", f"{base_id}+lora-{tag}")
            finally:
                ctx.params = ctx.model.params = base_params
            curve = info["steps"]
            rec = {"seed": seed, "budget": b, "full": full, "training_free": tf, "lora": lora,
                   "margin": lora["accuracy"] - tf["accuracy"], "train_seconds": info["train_seconds"],
                   "train_loss_first": curve[0]["loss"], "train_loss_last": curve[-1]["loss"],
                   "loss_curve": [{k: r[k] for k in ("step", "budget", "loss", "token_acc")} for r in curve],
                   "phases": info["phases"], "adapters": str(ad_dir)}
            records.append(rec)
            _log(f"seed {seed} budget {b}: training-free {tf['accuracy']:.1f}%  LoRA {lora['accuracy']:.1f}%  "
                 f"margin {rec['margin']:+.1f}  (train loss {rec['train_loss_first']:.3f} -> "
                 f"{rec['train_loss_last']:.3f}, {info['train_seconds']:.0f}s)")
    summary = {}
    for b in a.budgets:
        rs = [r for r in records if r["budget"] == b]
        summary[b] = {"schedule": schedules[b], "training_free": stats([r["training_free"]["accuracy"] for r in rs]),
                      "lora": stats([r["lora"]["accuracy"] for r in rs]), "margin": stats([r["margin"] for r in rs]),
                      "full": stats([r["full"]["accuracy"] for r in rs]),
                      "binomial_se": float(np.mean([binomial_se(r[v]["accuracy"], r[v]["n"]) for r in rs
                                                    for v in ("training_free", "lora")])),
                      "n_questions": [r["lora"]["n"] for r in rs]}
    out = {"model": str(a.model), "budget_kind": kind, "schedules": schedules, "seeds": a.seeds,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()
                        if k not in ("work", "out", "model")},
           "lora": lcfg.to_json(), "curriculum": {b: [p.__dict__ for p in cur.parse_curriculum(a.curriculum, b)]
                                                  for b in a.budgets},
           "summary": {str(b): v for b, v in summary.items()}, "runs": records,
           "wall_seconds": time.perf_counter() - t_start,
           "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    a.out.with_suffix(".md").write_text(report(out, a))
    _log(f"wrote {a.out.with_suffix('.md')} and .json ({out['wall_seconds']:.0f}s)")
    return 0


def report(out: dict, a) -> str:
    f = lambda s: f"{s['mean']:.1f} ± {s['std']:.1f}"
    lines = ["# SynthVQA: ADSC with LoRA fine-tuning vs training-free ADSC", "",
             f"- command: `python -m experiments.synthvqa.adsc_lora_compare {' '.join(sys.argv[1:])}`",
             f"- model: `{out['model']}`; devices: {out['devices']}; wall time {out['wall_seconds'] / 60:.1f} min",
             f"- budgets as `{out['budget_kind']}` (see `experiments/train/curriculum.py`): "
             + "; ".join(f"{b}: cuts after layers {s['layers']} keep {s['keeps']} "
                         f"(per-layer average {s['average']:.2f})"
                         for b, s in out["schedules"].items()),
             f"- LoRA: rank {out['lora']['rank']}, alpha {out['lora']['alpha']:g}, targets "
             f"{', '.join(out['lora']['targets'])}, every decoder layer; AdamW lr {a.lr:g} (3% warmup, cosine), "
             f"{a.steps} steps x {a.batch_size} rows on {a.train_images} train images of each seed; curriculum "
             f"`{a.curriculum}` = " + "; ".join(
                 f"{b}: " + ", ".join(f"{p['fraction']:g} @ {p['budget']}" for p in ph)
                 for b, ph in out["curriculum"].items()),
             f"- test: {a.test_images} test-split images per seed (questions: "
             + ", ".join(str(n) for n in next(iter(out["summary"].values()))["n_questions"])
             + f"), greedy decoding ({a.max_new_tokens} new tokens), exact match "
             "(`jaxprune/eval/benchmarks/synthvqa.py`); "
             f"chance level {np.mean([r['full']['chance'] for r in out['runs']]):.1f}%",
             f"- seeds {out['seeds']}: seed s = LoRA init + data order + train split s + test split s. "
             "Values: accuracy %, mean ± sample std over seeds; margin = LoRA − training-free on the same questions "
             "(paired), with the t 95% half-width; binomial SE = the test-set noise of one accuracy.", "",
             "| budget | full model | training-free ADSC | LoRA-ADSC | margin (LoRA − TF) | 95% CI of margin "
             "| binomial SE | per seed TF / LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for b, s in out["summary"].items():
        per = ", ".join(f"{t:.1f} / {l:.1f}" for t, l in zip(s["training_free"]["values"], s["lora"]["values"]))
        m = s["margin"]
        lo, hi = m["mean"] - m["ci95"], m["mean"] + m["ci95"]
        ci = "n/a (one seed)" if math.isnan(m["ci95"]) else f"[{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {b} | {f(s['full'])} | {f(s['training_free'])} | {f(s['lora'])} | {m['mean']:+.1f} ± "
                     f"{m['std']:.1f} | {ci} | {s['binomial_se']:.1f} | {per} |")
    lines += ["", "Per question type (mean over seeds):", "",
              "| budget | variant | " + " | ".join(next(iter(out["runs"]))["lora"]["per_type"]) + " |",
              "|---|---|" + "---|" * len(next(iter(out["runs"]))["lora"]["per_type"])]
    for b in out["summary"]:
        rs = [r for r in out["runs"] if str(r["budget"]) == str(b)]
        for v in ("training_free", "lora"):
            types = rs[0][v]["per_type"]
            lines.append(f"| {b} | {v} | " + " | ".join(f"{np.mean([r[v]['per_type'][t] for r in rs]):.1f}"
                                                        for t in types) + " |")
    lines += ["", "Training loss (answer tokens, at the step's budget), first -> last logged step:", ""]
    for r in out["runs"]:
        lines.append(f"- seed {r['seed']} budget {r['budget']}: {r['train_loss_first']:.3f} -> "
                     f"{r['train_loss_last']:.3f} ({r['train_seconds']:.0f}s)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
