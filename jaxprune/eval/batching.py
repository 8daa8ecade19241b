"""Questions -> static-shape batches: vicuna_v1 prompts, HF-style image-token expansion, length-sorted batches.

* Prompt: ``build_vicuna_v1_prompt(question.text)`` (LLaVA-1.5's ``--conv-mode vicuna_v1``), ``<image>\\n`` only
  for questions with an image (ScienceQA has text-only items).
* Token ids: :func:`jaxprune.processing.tokenize_prompts` (``<image>`` expanded to ``tokens_per_image`` ids, as the
  HF processor does), left-padded to the batch's longest prompt; the model right-pads to its length bucket.
* Batch plan: questions are grouped by image count (a static shape), sorted by prompt length (ties: file order)
  and cut into batches of exactly ``batch_size`` rows; the last batch of a group is padded with *dummy rows*
  (the batch's first prompt with a blank image) whose outputs are dropped.  The plan depends only on the
  question list, the tokenizer and the batch size, never on what is already done, so a resumed run computes
  every batch exactly as an uninterrupted run does.
* Prompt lengths for planning come from one batched tokenizer call with a single ``<image>`` id per image
  (+ ``tokens_per_image - 1``); the exact expansion is checked against it when a row is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxprune.eval.benchmarks import Question
from jaxprune.processing import (
    IMAGE_TOKEN,
    ImageProcessorConfig,
    build_vicuna_v1_prompt,
    preprocess_image,
    tokenize_prompts,
)

from .config import ConfigError, ItemError


@dataclasses.dataclass(frozen=True)
class Item:
    index: int          # position in the question list
    question: Question
    prompt: str
    n_images: int       # 0 or 1
    length: int         # prompt length in tokens after image expansion


@dataclasses.dataclass(frozen=True)
class Batch:
    items: tuple[Item, ...]  # the real rows (<= batch size); rows beyond are dummies
    size: int                # static batch size (rows incl. dummies)
    length: int              # longest prompt of the batch (tokens)
    n_images: int

    @property
    def keys(self) -> list[str]:
        return [it.question.key for it in self.items]


def has_image(q: Question) -> bool:
    return q.image is not None or q.image_b64 is not None


def check_tokenizer(tokenizer: Any, image_token_index: int) -> None:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid != image_token_index:
        raise ConfigError(f"the tokenizer maps {IMAGE_TOKEN!r} to id {tid}, the model expects {image_token_index} "
                          "(image_token_index): use the tokenizer saved with the model (--tokenizer DIR)")


def make_items(questions: Sequence[Question], tokenizer: Any, tokens_per_image: int) -> list[Item]:
    prompts = [build_vicuna_v1_prompt(q.text, with_image=has_image(q)) for q in questions]
    if not prompts:
        return []
    enc = tokenizer(prompts)["input_ids"]
    items = []
    for i, (q, p, ids) in enumerate(zip(questions, prompts, enc)):
        n = int(has_image(q))
        items.append(Item(i, q, p, n, len(ids) + n * (tokens_per_image - 1)))
    return items


def plan_batches(items: Sequence[Item], batch_size: int) -> list[Batch]:
    """Image batches first, then text-only ones; each group sorted by (length, file order)."""
    out: list[Batch] = []
    for n_img in sorted({it.n_images for it in items}, reverse=True):
        group = sorted((it for it in items if it.n_images == n_img), key=lambda it: (it.length, it.index))
        for s in range(0, len(group), batch_size):
            chunk = tuple(group[s:s + batch_size])
            out.append(Batch(chunk, batch_size, max(it.length for it in chunk), n_img))
    return out


def load_pixels(q: Question, img_cfg: ImageProcessorConfig) -> np.ndarray:
    """``[3, S, S]`` float32 for the question's image; :class:`ItemError` naming the question and file."""
    where = f"question {q.key!r}"
    path = q.image_path
    try:
        img = q.load_image()
    except FileNotFoundError:
        raise ItemError(f"{where}: image file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        src = f"image file {path}" if path is not None else "embedded base64 image"
        raise ItemError(f"{where}: cannot read {src}: {type(e).__name__}: {e}") from None
    try:
        return preprocess_image(img, img_cfg)
    except Exception as e:  # noqa: BLE001
        raise ItemError(f"{where}: cannot preprocess image {path}: {e}") from None


def missing_image_files(items: Sequence[Item]) -> dict[str, str]:
    """Pre-flight (stat only): ``key -> message`` for questions whose image file does not exist."""
    out = {}
    for it in items:
        q = it.question
        if q.image is not None and q.image_b64 is None:
            p = q.image_path
            if p is None or not p.is_file():
                out[q.key] = f"question {q.key!r}: image file not found: {p}"
    return out


@dataclasses.dataclass
class Rows:
    """Host arrays of one process' rows of a batch."""

    input_ids: np.ndarray       # [b, T] int32, left-padded
    attention_mask: np.ndarray  # [b, T] int32
    pixel_values: np.ndarray | None  # [b, 3, S, S] float32
    ok: np.ndarray              # [b] bool: a real row that loaded fine (False: dummy or failed)
    errors: dict[str, str]      # key -> message for rows that failed to load


def load_batch_images(batch: Batch, rows: range, img_cfg: ImageProcessorConfig, image_size: int
                      ) -> tuple[np.ndarray | None, np.ndarray, dict[str, str]]:
    """Pixels ``[b, 3, S, S]`` of the rows ``rows`` (None for a text-only batch), which real rows loaded, and
    ``key -> message`` for those that failed. Thread-safe (no tokenizer): the runner prefetches with it."""
    px = np.zeros((len(rows), 3, image_size, image_size), np.float32) if batch.n_images else None
    loaded = np.zeros(len(rows), bool)
    errors: dict[str, str] = {}
    for j, r in enumerate(rows):
        if r >= len(batch.items):
            continue
        q = batch.items[r].question
        if batch.n_images:
            try:
                px[j] = load_pixels(q, img_cfg)
            except ItemError as e:
                errors[q.key] = str(e)
                continue
        loaded[j] = True
    return px, loaded, errors


def build_rows(batch: Batch, rows: range, tokenizer: Any, image_token_index: int, tokens_per_image: int,
               img_cfg: ImageProcessorConfig, image_size: int,
               images: tuple[np.ndarray | None, np.ndarray, dict[str, str]] | None = None) -> Rows:
    """Tokenize and load the rows ``rows`` (global row indices) of ``batch``; failed / dummy rows become the
    batch's first prompt with a blank (zero = mean colour) image and ``ok=False``. ``images``: the result of
    :func:`load_batch_images` if already loaded."""
    T = batch.length
    dummy = batch.items[0]
    px, ok, errors = images if images is not None else load_batch_images(batch, rows, img_cfg, image_size)
    ids = np.full((len(rows), T), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for j, r in enumerate(rows):
        src = batch.items[r] if ok[j] else dummy
        if not ok[j] and px is not None:
            px[j] = 0.0
        enc = tokenize_prompts(tokenizer, [src.prompt], image_token_index, tokens_per_image)["input_ids"][0]
        if len(enc) != src.length:
            raise ConfigError(f"question {src.question.key!r}: {len(enc)} tokens after expanding {IMAGE_TOKEN!r}, "
                              f"{src.length} when planned: the tokenizer must treat {IMAGE_TOKEN!r} as one special "
                              "token")
        ids[j, T - len(enc):] = enc
        mask[j, T - len(enc):] = 1
    return Rows(ids, mask, px, np.asarray(ok, bool), errors)
