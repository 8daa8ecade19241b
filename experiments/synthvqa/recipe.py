"""The shipped synthetic-VQA model from scratch in one command: every training stage of its chain, in order.

``python -m experiments.synthvqa.recipe --work /tmp/synthvqa-recipe --out jaxprune/eval/synthvqa/checkpoint``

The checkpoint was trained as a chain of :mod:`experiments.synthvqa.train` runs, each continuing the previous one
(``--init``) as the recipe grew (v7 -> v12, ``experiments/results/synthvqa_training.md``). :data:`STAGES` lists them
with exactly the options each run used; this driver runs them one after the other, each into ``WORK/runK`` (a
finished stage is skipped on a rerun, so an interrupted chain resumes at the stage it was in), then copies the last
stage's checkpoint and every stage's log into ``--out`` (``train_log.json`` for stage 1,
``train_log_continue{K-1}.json`` for stage K, the names the shipped checkpoint carries) and writes ``recipe.json``
(stage commands, seconds per stage). ``--print`` writes the equivalent shell commands instead.

Time on 2 CPU cores (the stages as they ran, AMD EPYC, shared with short test runs; each stage's log holds its own
``total_seconds``): stage 1 30 min, 2 35 min, 3 19 min, 4 48 min, 5 29 min, 6 22 min -- about 3 h in all
(1829 + 2091 + 1123 + 2886 + 1752 + 1299 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

#: the chain of training runs of the shipped checkpoint: (name, :class:`~experiments.synthvqa.train.TrainConfig`
#: fields other than the defaults; ``init`` is set to the previous stage's checkpoint by the driver)
STAGES: tuple[tuple[str, dict], ...] = (
    ("v7", dict(n_train_images=12000, tower_steps=300, steps=1500, lr=0.0015, eval_every=50)),
    ("v8", dict(tower_steps=0, seed=1, steps=2000, lr=0.001, warmup=50, eval_every=100)),
    ("v9", dict(tower_steps=0, seed=2, steps=1000, lr=0.0007, warmup=30, eval_every=100)),
    ("v10", dict(tower_steps=400, scene_style="large", caption_steps=300, align_weight=1.0, aug_prob=0.5,
                 aug_min_keep=8, steps=2500, lr=1e-3, warmup=50, val_reduced=16, eval_every=250)),
    ("v11", dict(tower_steps=0, seed=3, scene_style="large", align_weight=1.0, aug_prob=0.5, aug_min_keep=8,
                 aug_object_bias=0.5, aug_evidence="every_object", attn_every_word=True, steps=1500, lr=7e-4,
                 warmup=50, val_reduced=16, eval_every=250)),
    ("v12", dict(tower_steps=0, seed=4, scene_style="large", align_weight=1.0, aug_prob=0.5, aug_min_keep=8,
                 aug_object_bias=0.5, aug_bias_per="object", aug_evidence="every_object", attn_every_word=True,
                 steps=1200, lr=5e-4, warmup=50, val_reduced=16, eval_every=200)),
)
DONE = ".stage_done"


def log_name(k: int) -> str:
    """The log file name of stage ``k`` (1-based) in the shipped checkpoint."""
    return "train_log.json" if k == 1 else f"train_log_continue{k - 1}.json"


def command(overrides: dict, out: str, init: str | None) -> str:
    """The ``python -m experiments.synthvqa.train`` command line of one stage."""
    args = [] if init is None else ["--init", init]
    for k, v in overrides.items():
        args += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return " ".join(["python -m experiments.synthvqa.train", *args, "--out", out])


def run(work: Path, out: Path | None, stages: tuple[tuple[str, dict], ...] = STAGES) -> dict:
    """Run ``stages`` into ``work/runK`` (skipping finished ones), copy the last checkpoint and the logs to ``out``."""
    from experiments.synthvqa.train import TrainConfig, train

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, ov in stages:
        bad = sorted(set(ov) - known)
        if bad or "init" in ov:
            raise ValueError(f"stage {name}: unknown or driver-owned TrainConfig fields {bad or ['init']}")
    work.mkdir(parents=True, exist_ok=True)
    record: list[dict] = []
    prev: Path | None = None
    for k, (name, ov) in enumerate(stages, 1):
        dst = work / f"run{k}"
        entry = {"stage": k, "name": name, "command": command(ov, str(dst), None if prev is None else str(prev))}
        if (dst / DONE).exists():
            entry |= json.loads((dst / DONE).read_text()) | {"skipped": True}
            print(f"[recipe] stage {k} ({name}): done before, skipped", flush=True)
        else:
            print(f"[recipe] stage {k} ({name}): {entry['command']}", flush=True)
            t0 = time.time()
            cfg = TrainConfig(**ov, **({} if prev is None else {"init": str(prev)}))
            train(cfg, dst, dst / log_name(k))
            entry["seconds"] = round(time.time() - t0, 1)
            (dst / DONE).write_text(json.dumps({"seconds": entry["seconds"]}))
        record.append(entry)
        prev = dst
    result = {"stages": record, "total_seconds": round(sum(e["seconds"] for e in record), 1)}
    if out is not None and prev is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in prev.iterdir():
            if f.is_file() and f.name != DONE and not f.name.startswith("train_log"):
                shutil.copy2(f, out / f.name)
        for k in range(1, len(stages) + 1):
            shutil.copy2(work / f"run{k}" / log_name(k), out / log_name(k))
        (out / "recipe.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for every stage's checkpoint (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="where the final checkpoint and the logs go")
    ap.add_argument("--print", action="store_true", help="print the equivalent shell commands and exit")
    a = ap.parse_args(argv)
    if a.print:
        prev = None
        for k, (_, ov) in enumerate(STAGES, 1):
            dst = str(a.work / f"run{k}")
            print(command(ov, dst, prev) + f" --log {dst}/{log_name(k)}")
            prev = dst
        return
    res = run(a.work, a.out)
    print(f"[recipe] {len(res['stages'])} stages, {res['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
