"""ADSC fine-tuning: LoRA adapters on the decoder, trained with the ADSC bottlenecks active (AdamW, loss on the
answer tokens only) over a reverse curriculum of drop ratios; adapters saved with orbax.

    python -m experiments.train.adsc_lora --model MODEL_DIR --data INSTRUCT.json [--images DIR] --target 16 \\
        [--curriculum reverse] [--steps 300] [--batch-size 16] [--lr 1e-3] [--rank 8] [--alpha 16] \\
        [--budget-kind auto] [--seed 0] --out OUT_DIR

* Model: an HF LLaVA-1.5 directory (or a ``python -m checkpoints_convert`` output) with its tokenizer; images are
  preprocessed exactly as the evaluation harness does (``preprocessor_config.json`` if it matches the tower,
  else LLaVA 'pad' at the tower's size; :func:`jaxprune.processing.preprocess_image`).
* Data: LLaVA instruction JSON (``llava_v1_5_mix665k.json`` layout; ``image`` relative to ``--images``, default
  the JSON's folder), rendered and labelled by :mod:`experiments.train.batches` (vicuna_v1, answers + ``</s>``).
  Records without an image, or longer than ``--max-length`` tokens, are skipped (counted in the log).
* Forward: the model with the ADSC schedule of the current phase's budget (:mod:`experiments.train.curriculum`:
  what "reverse curriculum" means here and what a budget stands for), through the inference code path
  (:mod:`experiments.train.reduced`); LoRA (:mod:`jaxprune.lora`) on every decoder linear by default.
* Optimiser: AdamW (weight decay 0, LLaVA's LoRA recipe), linear warmup over ``--warmup`` of the steps then cosine
  to 0, global-norm clipping at 1.0. Data parallel over every device (``data`` mesh axis); several hosts:
  ``jax.distributed.initialize`` before calling (each process loads its own rows of every global batch).
* Output: ``OUT/adapters`` (:func:`jaxprune.lora.save_adapters`: orbax arrays + ``lora_config.json`` with the run
  settings), ``OUT/train_log.json`` (per-step loss / token accuracy / budget / lr, the resolved ADSC schedules,
  data counts, timings). ``--eval-data`` adds teacher-forced answer loss / accuracy of the base model and of the
  adapters at each ``--eval-budgets`` on a held-out instruction JSON; ``--export-merged DIR`` writes base + adapters
  merged (:func:`jaxprune.lora.merge_lora`) as an HF checkpoint for ``jaxprune-eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from experiments.train import curriculum as cur
from experiments.train.batches import Conversation, collate, encode, read_llava_instructions
from experiments.train.reduced import LoraTrainer
from jaxprune.lora import LoraConfig, init_lora, num_params, save_adapters


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    target: int | None = None          # budget the relative curriculum phases refer to
    curriculum: str = "reverse"        # preset or spec (experiments.train.curriculum)
    steps: int = 300
    batch_size: int = 16               # global rows per step
    lr: float = 1e-3
    warmup: float = 0.03               # fraction of the steps
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    budget_kind: str = "auto"          # "average" | "final" | "auto"
    layers: tuple[int, ...] | None = None  # ADSC cut layers (None: the template)
    max_length: int = 2048
    bucket: int = 32                   # every batch is padded to the dataset's longest row, rounded up to this
    log_every: int = 25


def image_config(model_dir: str | Path | None, cfg, mode: str = "pad"):
    """The evaluation harness's image preprocessing for this model (``jaxprune.eval.runner.Context.create``)."""
    from jaxprune.processing import ImageProcessorConfig

    img = None
    pp = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
    if pp is not None and pp.is_file():
        img = ImageProcessorConfig.from_hf_preprocessor_config(json.loads(pp.read_text()), mode=mode)
    if img is None or img.image_size != cfg.vision.image_size:
        s = cfg.vision.image_size
        img = ImageProcessorConfig(image_size=s, shortest_edge=s, mode=mode)
    return img


@dataclasses.dataclass
class Dataset:
    ids: list[np.ndarray]
    labels: list[np.ndarray]
    images: list[Path]
    length: int                        # padded length of every batch
    skipped: dict[str, int]


def build_dataset(convs: list[Conversation], image_root: str | Path, tokenizer: Any, cfg, max_length: int,
                  bucket: int) -> Dataset:
    root = Path(image_root)
    ids, labels, images = [], [], []
    skipped = {"no_image": 0, "too_long": 0}
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for c in convs:
        if c.image is None:
            skipped["no_image"] += 1
            continue
        if c.turns not in cache:
            cache[c.turns] = encode(tokenizer, c.turns, cfg.image_token_index, cfg.tokens_per_image)
        i, lab = cache[c.turns]
        if len(i) > max_length:
            skipped["too_long"] += 1
            continue
        ids.append(i)
        labels.append(lab)
        images.append(root / c.image)
    if not ids:
        raise ValueError(f"no usable training record (skipped: {skipped})")
    longest = max(len(i) for i in ids)
    return Dataset(ids, labels, images, -(-longest // bucket) * bucket, skipped)


def load_batch(ds: Dataset, idx: np.ndarray, img_cfg, pad_id: int) -> dict[str, np.ndarray]:
    from jaxprune.processing import load_image, preprocess_image

    b = collate([(ds.ids[i], ds.labels[i]) for i in idx], pad_id=pad_id, length=ds.length)
    px = np.stack([preprocess_image(load_image(ds.images[i]), img_cfg) for i in idx])
    return {"input_ids": b.input_ids, "valid": b.valid, "labels": b.labels, "pixel_values": px}


def optimizer(s: TrainSettings):
    warm = round(s.warmup * s.steps)
    if warm:  # HF / LLaVA: linear from 0, then cosine to 0
        sched = optax.warmup_cosine_decay_schedule(0.0, s.lr, warm, max(s.steps, warm + 1), 0.0)
    else:
        sched = optax.cosine_decay_schedule(s.lr, max(s.steps, 1))
    return optax.chain(optax.clip_by_global_norm(s.clip), optax.adamw(sched, weight_decay=s.weight_decay)), sched


def resolve_reducers(budgets, cfg, kind: str, layers=None) -> tuple[str, dict[int, Any]]:
    """``(resolved kind, {budget: ADSC spec})`` for every budget of the run (one convention for all)."""
    L, N = cfg.text.num_hidden_layers, cfg.tokens_per_image
    kind = cur.resolve_kind(kind, budgets, L, N, layers)
    return kind, {b: cur.adsc_reducer(b, L, N, kind, layers) for b in sorted(set(budgets))}


def train(model, tokenizer, ds: Dataset, img_cfg, lora_cfg: LoraConfig, s: TrainSettings,
          trainer: LoraTrainer | None = None, log=print, eval_budgets=()) -> tuple[dict, dict]:
    """Fine-tune fresh adapters on ``ds``; returns ``(adapters as NumPy, log dict)``. Pass a ``trainer`` built
    with the same settings to reuse its compiled steps across runs."""
    from jaxprune.eval import distributed as dist

    cfg = model.cfg
    phases = cur.parse_curriculum(s.curriculum, s.target)
    bounds = cur.phase_bounds(phases, s.steps)
    kind, reducers = resolve_reducers([p.budget for p in phases] + list(eval_budgets), cfg, s.budget_kind, s.layers)
    opt, sched = optimizer(s)
    trainer = trainer or LoraTrainer(model, lora_cfg, opt)
    B = s.batch_size
    if B % trainer.mesh.devices.size:
        raise ValueError(f"batch size {B} does not divide over {trainer.mesh.devices.size} devices")
    if len(ds.ids) < B:
        raise ValueError(f"{len(ds.ids)} training rows < batch size {B}")
    mine = dist.local_rows(trainer.mesh, B)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    adapters, state = trainer.init(init_lora(model, lora_cfg, jax.random.key(s.seed)))
    rng = np.random.default_rng(s.seed)
    order, pos = rng.permutation(len(ds.ids)), 0
    L, N = cfg.text.num_hidden_layers, cfg.tokens_per_image
    info: dict[str, Any] = {
        "settings": dataclasses.asdict(s), "lora": lora_cfg.to_json(), "lora_params": num_params(adapters),
        "budget_kind": kind, "phases": [{"start": a, "stop": b, "budget": k, **cur.describe(reducers[k], L, N)}
                                        for a, b, k in bounds],
        "rows": len(ds.ids), "seq_len": ds.length, "skipped": ds.skipped, "devices": trainer.mesh.devices.size,
        "steps": []}
    t0 = time.perf_counter()
    for step in range(s.steps):
        if pos + B > len(order):
            order, pos = rng.permutation(len(ds.ids)), 0
        idx = order[pos:pos + B]
        pos += B
        budget = cur.budget_at(bounds, step)
        batch = trainer.shard(load_batch(ds, idx[mine.start:mine.stop], img_cfg, pad_id))
        adapters, state, met = trainer.step(adapters, state, batch, reducers[budget])
        if (step + 1) % s.log_every == 0 or step == 0 or step + 1 == s.steps:
            met = {k: float(v) for k, v in jax.device_get(met).items()}
            rec = {"step": step + 1, "budget": budget, "loss": met["loss"],
                   "token_acc": met["hits"] / max(met["tokens"], 1), "grad_norm": met["grad_norm"],
                   "lr": float(sched(step)), "seconds": time.perf_counter() - t0}
            info["steps"].append(rec)
            log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
    info["train_seconds"] = time.perf_counter() - t0
    return jax.tree.map(np.asarray, jax.device_get(adapters)), info


def teacher_forced(trainer: LoraTrainer, adapters, ds: Dataset, img_cfg, pad_id: int, reducer, batch_size: int
                   ) -> dict[str, float]:
    """Answer-token loss and accuracy over ``ds`` (whole batches only) with ``reducer`` (None = full model)."""
    from jaxprune.eval import distributed as dist

    mine = dist.local_rows(trainer.mesh, batch_size)
    tot = {"loss": 0.0, "tokens": 0.0, "hits": 0.0}
    for s in range(0, len(ds.ids) - batch_size + 1, batch_size):
        idx = np.arange(s, s + batch_size)[mine.start:mine.stop]
        met = jax.device_get(trainer.evaluate(adapters, trainer.shard(load_batch(ds, idx, img_cfg, pad_id)), reducer))
        tot["loss"] += float(met["loss"]) * float(met["tokens"])
        tot["tokens"] += float(met["tokens"])
        tot["hits"] += float(met["hits"])
    n = max(tot["tokens"], 1.0)
    return {"loss": tot["loss"] / n, "token_acc": tot["hits"] / n, "tokens": int(tot["tokens"])}


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.train.adsc_lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF LLaVA-1.5 / converted directory with its tokenizer")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    ap.add_argument("--data", required=True, type=Path, help="LLaVA instruction JSON")
    ap.add_argument("--images", type=Path, help="image folder the JSON's paths are relative to (default: its folder)")
    ap.add_argument("--target", type=int, help="target ADSC budget (what relative curriculum phases refer to)")
    ap.add_argument("--curriculum", default="reverse",
                    help=f"preset {sorted(cur.PRESETS)} or 'FRAC:BUDGET,...' / 'FRAC:xMULT,...' (default: reverse)")
    ap.add_argument("--budget-kind", default="auto", choices=cur.KINDS)
    ap.add_argument("--layers", type=lambda t: tuple(int(x) for x in t.split(",")), help="ADSC cut layers, e.g. 1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.03)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default=",".join(LoraConfig().targets), help="decoder linears to adapt")
    ap.add_argument("--lora-layers", type=lambda t: tuple(int(x) for x in t.split(",")), help="decoder layers")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eval-data", type=Path, help="held-out instruction JSON for teacher-forced loss / accuracy")
    ap.add_argument("--eval-images", type=Path)
    ap.add_argument("--eval-budgets", type=lambda t: [int(x) for x in t.split(",")],
                    help="budgets to evaluate at (default: the target)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--export-merged", type=Path, help="also write base + adapters merged as an HF checkpoint "
                    "(with --model's tokenizer / processor files): loadable by jp.load and jaxprune-eval")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)

    import jax.numpy as jnp

    import jaxprune as jp
    from jaxprune.eval.sweep import load_tokenizer

    if (a.out / "adapters").exists() and not a.overwrite:
        ap.error(f"{a.out / 'adapters'} exists (pass --overwrite)")
    model = jp.load(a.model, dtype=jnp.dtype(a.dtype))
    tok = load_tokenizer(a.tokenizer or a.model)
    img_cfg = image_config(a.model, model.cfg)
    s = TrainSettings(target=a.target, curriculum=a.curriculum, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                      warmup=a.warmup, weight_decay=a.weight_decay, seed=a.seed, budget_kind=a.budget_kind,
                      layers=a.layers, max_length=a.max_length, log_every=a.log_every)
    lcfg = LoraConfig(rank=a.rank, alpha=a.alpha, targets=tuple(a.targets.split(",")), layers=a.lora_layers)
    ds = build_dataset(read_llava_instructions(a.data), a.images or a.data.parent, tok, model.cfg, s.max_length,
                       s.bucket)
    eval_budgets = a.eval_budgets or ([a.target] if a.target else [])
    opt, _ = optimizer(s)
    trainer = LoraTrainer(model, lcfg, opt)
    adapters, info = train(model, tok, ds, img_cfg, lcfg, s, trainer, eval_budgets=eval_budgets,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    info.update(model=str(a.model), data=str(a.data))
    if a.eval_data is not None:
        eds = build_dataset(read_llava_instructions(a.eval_data), a.eval_images or a.eval_data.parent, tok, model.cfg,
                            s.max_length, s.bucket)
        _, reducers = resolve_reducers(eval_budgets, model.cfg, info["budget_kind"], s.layers)
        zero = jax.tree.map(np.zeros_like, adapters)  # b = 0 -> the base model
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        info["eval"] = {"full": {"base": teacher_forced(trainer, zero, eds, img_cfg, pad, None, s.batch_size),
                                 "lora": teacher_forced(trainer, adapters, eds, img_cfg, pad, None, s.batch_size)}}
        for b, r in reducers.items():
            info["eval"][str(b)] = {v: teacher_forced(trainer, ad, eds, img_cfg, pad, r, s.batch_size)
                                    for v, ad in (("base", zero), ("lora", adapters))}
        print(json.dumps(info["eval"], indent=1), file=sys.stderr)
    if jax.process_index() == 0:
        a.out.mkdir(parents=True, exist_ok=True)
        save_adapters(a.out / "adapters", adapters, lcfg, overwrite=a.overwrite,
                      metadata={"model": str(a.model), "data": str(a.data), "budget_kind": info["budget_kind"],
                                "phases": info["phases"], "settings": info["settings"]})
        (a.out / "train_log.json").write_text(json.dumps(info, indent=1))
        print(f"adapters: {a.out / 'adapters'}; log: {a.out / 'train_log.json'}", file=sys.stderr)
        if a.export_merged is not None:
            from jaxprune.checkpoints import export_hf
            from jaxprune.lora import merge_lora

            merged = merge_lora(model, adapters, lcfg)
            export_hf(model.cfg, merged.flat_params(), a.export_merged, force=a.overwrite,
                      support_dir=a.tokenizer or a.model)
            print(f"merged checkpoint: {a.export_merged}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
