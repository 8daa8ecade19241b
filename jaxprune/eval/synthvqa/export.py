"""The synthetic VQA set as files: an evaluation benchmark, LLaVA instruction data, a stand-in model.

* :func:`write_benchmark` -- ``jaxprune-eval --benchmark synthvqa --data DIR`` reads it
  (:mod:`jaxprune.eval.benchmarks.synthvqa`)::

      DIR/llava_synthvqa_{split}.jsonl      {"question_id", "image", "text" (+ short-answer suffix), "category"}
      DIR/synthvqa_{split}_answers.jsonl    {"question_id", "answer", "category"}
      DIR/images/{split}_{seed}_{i:06d}.png
      DIR/synthvqa_meta.json                split, seed, sizes, question mix, chance levels

  (the question file is GQA's ``llava_gqa_testdev_balanced.jsonl`` layout; ``image`` is relative to ``images/``).
* :func:`write_instructions` -- LLaVA instruction JSON for fine-tuning
  (:func:`experiments.train.batches.read_llava_instructions` reads it; ``image`` is relative to ``DIR``)::

      DIR/synthvqa_{split}_instruct.json    [{"id", "image": "images/...png",
                                              "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                {"from": "gpt", "value": answer}]}]
      DIR/images/...

* the check of a model on a slice of the test split is :mod:`.check` (it runs the harness, which imports this
  module: the data side never imports the harness).
* :func:`write_standin_checkpoint` -- a random-weight HF checkpoint shaped like the shipped one (tests, and the
  notebook before the trained checkpoint exists).

Everything is written atomically (a temp folder next to ``DIR``, renamed when complete). Image ``i`` of a split
is a pure function of ``(split, seed, i)`` (:mod:`.dataset`), so the files are the same bytes on every run.

Command line::

    python -m jaxprune.eval.synthvqa.export benchmark DIR [--split test] [--seed 0] [--n-images 200]
                                                        [--n-questions N]
    python -m jaxprune.eval.synthvqa.export instructions DIR [--split train] [--seed 0] [--n-images 5000]
                                                           [--multi-turn]
    python -m jaxprune.eval.synthvqa.export standin DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .dataset import Item, make_item
from .questions import CHANCE, QA, QTYPES
from .scene import render

IMAGE_DIR = "images"
META_FILE = "synthvqa_meta.json"
FORMAT_VERSION = 1


def question_file(split: str) -> str:
    return f"llava_synthvqa_{split}.jsonl"


def answers_file(split: str) -> str:
    return f"synthvqa_{split}_answers.jsonl"


def instructions_file(split: str) -> str:
    return f"synthvqa_{split}_instruct.json"


def question_id(item: Item, qa: QA) -> str:
    """Unique per split and seed: at most one question of each type per image."""
    return f"{item.image_id}_{qa.qtype}"


def chance_level(qtypes: list[str]) -> float:
    """Chance accuracy (percent) of a question mix: :data:`~.questions.CHANCE` weighted by the type counts."""
    return 100.0 * sum(CHANCE[t] for t in qtypes) / len(qtypes) if qtypes else 0.0


def collect(split: str, seed: int, n_images: int | None = None, n_questions: int | None = None,
            qtypes: tuple[str, ...] = QTYPES, style: str = "grid") -> list[tuple[Item, tuple[QA, ...]]]:
    """Images ``0, 1, ...`` of a split with their questions: ``n_images`` images, or as many as the first
    ``n_questions`` questions need (the last image's questions truncated). With both, the smaller set wins.
    ``style``: the scene style (:data:`.scene.STYLES`; ids of non-default styles end in ``_{style}``)."""
    if n_images is None and n_questions is None:
        raise ValueError("give n_images or n_questions")
    if (n_images is not None and n_images < 1) or (n_questions is not None and n_questions < 1):
        raise ValueError(f"n_images and n_questions must be >= 1, got {n_images}, {n_questions}")
    out: list[tuple[Item, tuple[QA, ...]]] = []
    left = n_questions
    i = 0
    while (n_images is None or i < n_images) and (left is None or left > 0):
        item = make_item(split, seed, i, qtypes, style=style)
        qas = item.qas if left is None else item.qas[:left]
        if left is not None:
            left -= len(qas)
        out.append((item, qas))
        i += 1
    return out


@contextlib.contextmanager
def _atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder next to ``dst``, renamed to ``dst`` on success (``overwrite`` replaces an existing one)."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}-old-", dir=dst.parent))
            os.rename(dst, old / "x")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_png(item: Item, folder: Path) -> str:
    import PIL.Image

    name = f"{item.image_id}.png"
    PIL.Image.fromarray(render(item.scene).image).save(folder / name, format="PNG")
    return name


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_benchmark(dst: str | Path, split: str = "test", seed: int = 0, n_images: int | None = 200,
                    n_questions: int | None = None, qtypes: tuple[str, ...] = QTYPES,
                    overwrite: bool = False, style: str = "grid") -> Path:
    """Write the evaluation files of ``(split, seed)`` into ``dst`` (see the module docstring); returns ``dst``.

    ``n_images`` images (all their questions), or, with ``n_questions``, the first ``n_questions`` questions.
    ``style``: the scene style (default ``"grid"``: the benchmark as it always was; the meta file records it)."""
    dst = Path(dst)
    data = collect(split, seed, n_images, n_questions, qtypes, style)
    with _atomic_dir(dst, overwrite) as tmp:
        (tmp / IMAGE_DIR).mkdir()
        qrows, arows = [], []
        for item, qas in data:
            image = _save_png(item, tmp / IMAGE_DIR)
            for qa in qas:
                qid = question_id(item, qa)
                qrows.append({"question_id": qid, "image": image, "text": qa.text, "category": qa.qtype})
                arows.append({"question_id": qid, "answer": qa.answer, "category": qa.qtype})
        (tmp / question_file(split)).write_text(_jsonl(qrows), encoding="utf-8")
        (tmp / answers_file(split)).write_text(_jsonl(arows), encoding="utf-8")
        types = [r["category"] for r in qrows]
        meta = {"format": "synthvqa-benchmark", "version": FORMAT_VERSION, "split": split, "seed": seed,
                "n_images": len(data), "n_questions": len(qrows), "qtypes": list(qtypes),
                "question_file": question_file(split), "answers_file": answers_file(split),
                "image_folder": IMAGE_DIR, "questions_per_type": {t: types.count(t) for t in qtypes},
                "chance_per_type": {t: 100.0 * CHANCE[t] for t in qtypes}, "chance": chance_level(types)}
        if style != "grid":
            meta["style"] = style
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return dst


def write_instructions(dst: str | Path, split: str = "train", seed: int = 0, n_images: int = 5000,
                       qtypes: tuple[str, ...] = QTYPES, multi_turn: bool = False,
                       overwrite: bool = False) -> Path:
    """LLaVA instruction JSON + images of ``(split, seed)`` in ``dst``; returns the JSON's path.

    One record per question (``id`` = the question id) by default; ``multi_turn`` gives one record per image with
    all its questions as turns (``<image>`` in the first, as LLaVA's VQA training data)."""
    dst = Path(dst)
    data = collect(split, seed, n_images, None, qtypes)
    with _atomic_dir(dst, overwrite) as tmp:
        (tmp / IMAGE_DIR).mkdir()
        records = []
        for item, qas in data:
            image = f"{IMAGE_DIR}/{_save_png(item, tmp / IMAGE_DIR)}"
            if multi_turn:
                conv = []
                for j, qa in enumerate(qas):
                    conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + qa.text},
                             {"from": "gpt", "value": qa.answer}]
                records.append({"id": item.image_id, "image": image, "conversations": conv})
            else:
                records += [{"id": question_id(item, qa), "image": image,
                             "conversations": [{"from": "human", "value": "<image>\n" + qa.text},
                                               {"from": "gpt", "value": qa.answer}]} for qa in qas]
        (tmp / instructions_file(split)).write_text(json.dumps(records, indent=0) + "\n", encoding="utf-8")
    return dst / instructions_file(split)


# ---- stand-in model -----------------------------------------------------------------------------------------
def standin_config():
    """The shipped model's config (``MODEL_CFG`` of the training script ``experiments/synthvqa/train.py``, repeated
    here: the library never imports the scripts): 96 px / 8 px patches = 144 visual tokens, 4-layer decoder, 128-word vocabulary, ``<image>`` = 127."""
    from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                            image_size=96, patch_size=8),
        text=TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=(2,),
                        pad_token_id=0, max_position_embeddings=1024),
        image_token_index=127)


def standin_words() -> tuple[str, ...]:
    """The words of the vicuna_v1 prompt, then the synthetic set's vocabulary (lower case; the shipped tokenizer's
    order)."""
    import re

    from jaxprune.processing import VICUNA_V1_SYSTEM

    from .questions import vocabulary

    prompt = re.findall(r"\w+|[^\w\s]+", (VICUNA_V1_SYSTEM + " USER: ASSISTANT:").lower())
    return tuple(dict.fromkeys(prompt + list(vocabulary())))


def write_standin_checkpoint(dst: str | Path, seed: int = 0) -> Path:
    """Random weights at :func:`standin_config` as an HF checkpoint (``config.json``, ``model.safetensors``,
    word-level ``tokenizer.json`` + ``tokenizer_config.json``, ``preprocessor_config.json``) in ``dst`` -- the
    layout of the shipped checkpoint."""
    import jaxprune as jp
    from jaxprune.checkpoints import export_hf
    from jaxprune.eval.wordtok import save_word_tokenizer, word_tokenizer
    from jaxprune.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    cfg = standin_config()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    s = cfg.vision.image_size
    with tempfile.TemporaryDirectory(dir=dst.parent) as d:
        sup = save_word_tokenizer(word_tokenizer(standin_words(), cfg.text.vocab_size, cfg.image_token_index),
                                  Path(d) / "tokenizer")
        (sup / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
        export_hf(cfg, jp.Llava.random(cfg, seed=seed).flat_params(), dst, layout="legacy", support_dir=sup)
    return dst


# ---- command line -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxprune.eval.synthvqa.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("benchmark", help="evaluation files (jaxprune-eval --benchmark synthvqa --data DIR)")
    b.add_argument("dst")
    b.add_argument("--split", default="test")
    b.add_argument("--n-images", type=int, default=200)
    b.add_argument("--n-questions", type=int, help="first N questions (overrides --n-images)")
    t = sub.add_parser("instructions", help="LLaVA instruction JSON + images for fine-tuning")
    t.add_argument("dst")
    t.add_argument("--split", default="train")
    t.add_argument("--n-images", type=int, default=5000)
    t.add_argument("--multi-turn", action="store_true", help="one record per image, its questions as turns")
    for p in (b, t):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--qtypes", default=",".join(QTYPES), help=f"comma-separated subset of {','.join(QTYPES)}")
        p.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("standin", help="a random-weight HF checkpoint shaped like the shipped model")
    s.add_argument("dst")
    args = ap.parse_args(argv)
    if args.cmd == "benchmark":
        dst = write_benchmark(args.dst, args.split, args.seed, None if args.n_questions else args.n_images,
                              args.n_questions, tuple(args.qtypes.split(",")), args.overwrite)
        meta = json.loads((dst / META_FILE).read_text())
        print(f"{dst}: {meta['n_questions']} questions on {meta['n_images']} images "
              f"({meta['questions_per_type']}; chance {meta['chance']:.1f}%)")
    elif args.cmd == "instructions":
        path = write_instructions(args.dst, args.split, args.seed, args.n_images, tuple(args.qtypes.split(",")),
                                  args.multi_turn, args.overwrite)
        print(f"{path}: {len(json.loads(path.read_text()))} records")
    else:
        print(write_standin_checkpoint(args.dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
