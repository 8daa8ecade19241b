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
* LLaVA-NeXT (anyres): an image's placeholder count depends on its size, so planning reads each image's size
  from its header (:func:`image_hw`, no decoding), pixels are ``[crops, 3, S, S]`` padded to the config's maximum
  crops, and every row carries ``image_sizes`` (HF ``LlavaNextProcessor`` convention).
* LLaVA-OneVision (``img_cfg`` a :class:`~jaxprune.processing_onevision.OnevisionProcessorConfig`): as NeXT
  (one image per question: the anyres path), with the model card's Qwen2 chat-template prompt.
* Video-LLaVA (``img_cfg`` a :class:`~jaxprune.eval.video.VideoEvalConfig`): a question with a video gets the
  ``USER: <video>\\n... ASSISTANT:`` prompt, ``<video>`` expanded to ``tokens_per_video`` ids, and its row
  ``pixel_values_videos [F, 3, S, S]`` (:mod:`jaxprune.eval.video`).
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxprune.eval.benchmarks import Question
from jaxprune.processing_anyres import AnyresProcessorConfig, anyres_grid, preprocess_anyres_image
from jaxprune.processing_onevision import OnevisionProcessorConfig
from jaxprune.processing import (
    IMAGE_TOKEN,
    ImageProcessorConfig,
    build_vicuna_v1_prompt,
    preprocess_image,
    tokenize_prompts,
)

from . import video as vid
from .config import ConfigError, ItemError


#: image configs with size-dependent placeholder counts and ``[crops, 3, S, S]`` pixels (LLaVA-NeXT, OneVision)
ANYRES = (AnyresProcessorConfig, OnevisionProcessorConfig)


@dataclasses.dataclass(frozen=True)
class Item:
    index: int          # position in the question list
    question: Question
    prompt: str
    n_images: int       # 0 or 1
    length: int         # prompt length in tokens after image expansion
    image_tokens: int = 0  # placeholder tokens of its image (0: no image)
    image_crops: int = 1   # crops its image is cut into (anyres: 1 base + tiles; else 1)


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
    return q.has_image


def has_visual(q: Question) -> bool:
    """An image or a video."""
    return has_image(q) or q.video is not None


def check_tokenizer(tokenizer: Any, image_token_index: int) -> None:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid != image_token_index:
        raise ConfigError(f"the tokenizer maps {IMAGE_TOKEN!r} to id {tid}, the model expects {image_token_index} "
                          "(image_token_index): use the tokenizer saved with the model (--tokenizer DIR)")


def image_hw(q: Question) -> tuple[int, int]:
    """(height, width) of the question's image from its header (PIL opens lazily: nothing is decoded)."""
    from PIL import Image

    if q.image_blob is not None:
        src: Any = io.BytesIO(q.image_blob.data)
    else:
        src = io.BytesIO(base64.b64decode(q.image_b64)) if q.image_b64 is not None else q.image_path
    with Image.open(src) as img:
        return int(img.height), int(img.width)


def image_tokens_of(q: Question, img_cfg: Any, tokens_per_image: int) -> tuple[int, int]:
    """(placeholder tokens, crops) of ``q``'s image: ``(tokens_per_image, 1)`` for fixed-size models, or the anyres
    count of its size (LLaVA-NeXT; an unreadable image plans with the maximum and fails when loaded)."""
    if isinstance(img_cfg, vid.VideoEvalConfig) and q.video is not None:
        return img_cfg.tokens_per_video, img_cfg.num_frames
    if not isinstance(img_cfg, ANYRES):
        return tokens_per_image, 1
    try:
        h, w = image_hw(q)
    except Exception:  # noqa: BLE001 - reported when the row is built
        return tokens_per_image, img_cfg.max_crops
    gh, gw = anyres_grid((h, w), img_cfg.pinpoints_hw, img_cfg.crop_size)
    return img_cfg.num_image_tokens(h, w), 1 + gh * gw


def make_items(questions: Sequence[Question], tokenizer: Any, tokens_per_image: int, img_cfg: Any = None
               ) -> list[Item]:
    """Prompts and planned lengths; ``img_cfg`` (an :class:`AnyresProcessorConfig` for LLaVA-NeXT) decides the
    placeholder count of each image (``tokens_per_image`` is then the maximum)."""
    chat = img_cfg.prompt if isinstance(img_cfg, OnevisionProcessorConfig) else build_vicuna_v1_prompt
    prompts = [vid.prompt(q) if q.video is not None else chat(q.text, with_image=has_image(q)) for q in questions]
    if not prompts:
        return []
    enc = tokenizer(prompts)["input_ids"]
    items = []
    for i, (q, p, ids) in enumerate(zip(questions, prompts, enc)):
        n = int(has_visual(q))
        k, c = image_tokens_of(q, img_cfg, tokens_per_image) if n else (0, 1)
        items.append(Item(i, q, p, n, len(ids) + n * (k - 1), k, c))
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


def load_pixels(q: Question, img_cfg: ImageProcessorConfig | AnyresProcessorConfig):
    """``[3, S, S]`` float32 for the question's image (anyres: ``([crops, 3, S, S], (h, w))``); :class:`ItemError`
    naming the question and file."""
    where = f"question {q.key!r}"
    path = q.image_path
    try:
        img = q.load_image()
    except FileNotFoundError:
        raise ItemError(f"{where}: image file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ItemError(f"{where}: cannot read {q.image_source}: {type(e).__name__}: {e}") from None
    try:
        if isinstance(img_cfg, OnevisionProcessorConfig):
            return img_cfg.preprocess(img)
        if isinstance(img_cfg, AnyresProcessorConfig):
            return preprocess_anyres_image(img, img_cfg)
        return preprocess_image(img, img_cfg)
    except Exception as e:  # noqa: BLE001
        raise ItemError(f"{where}: cannot preprocess {q.image_source}: {e}") from None


def missing_image_files(items: Sequence[Item]) -> dict[str, str]:
    """Pre-flight (stat only): ``key -> message`` for questions whose image file does not exist."""
    out = {}
    for it in items:
        q = it.question
        if q.video is not None:
            if q.video_path is None or not q.video_path.is_file():
                out[q.key] = vid.missing_message(q)
        elif q.image is not None and q.image_b64 is None:
            p = q.image_path
            if p is None or not p.is_file():
                out[q.key] = f"question {q.key!r}: image file not found: {p}"
    return out


@dataclasses.dataclass
class Rows:
    """Host arrays of one process' rows of a batch."""

    input_ids: np.ndarray       # [b, T] int32, left-padded
    attention_mask: np.ndarray  # [b, T] int32
    pixel_values: np.ndarray | None  # [b, 3, S, S] float32 (anyres: [b, crops, 3, S, S])
    ok: np.ndarray              # [b] bool: a real row that loaded fine (False: dummy or failed)
    errors: dict[str, str]      # key -> message for rows that failed to load
    image_sizes: np.ndarray | None = None  # [b, 2] (height, width): anyres (LLaVA-NeXT) only
    pixel_values_videos: np.ndarray | None = None  # [b, F, 3, S, S] float32: video rows (Video-LLaVA)
    reducer_inputs: dict[str, np.ndarray] | None = None  # name -> [b, P] per-question reducer inputs (synthvqa)


#: the ``Question.metadata`` key of per-question reducer inputs (``{name: [P] array}``; synthvqa's ``patch_prior``)
REDUCER_INPUTS = "reducer_inputs"


@dataclasses.dataclass
class LoadedImages:
    """Pixels of some rows of a batch (what :func:`load_batch_images` returns; thread-safe to build)."""

    pixel_values: np.ndarray | None   # [b, 3, S, S] (anyres: [b, crops, 3, S, S]); None for a text-only batch
    loaded: np.ndarray                # [b] bool: a real row whose image loaded
    errors: dict[str, str]            # key -> message for rows that failed
    image_sizes: np.ndarray | None = None  # [b, 2] (height, width), anyres only

    def __iter__(self):  # (px, loaded, errors), the historical tuple
        return iter((self.pixel_values, self.loaded, self.errors))


def load_batch_images(batch: Batch, rows: range, img_cfg: ImageProcessorConfig | AnyresProcessorConfig,
                      image_size: int) -> LoadedImages:
    """Pixels of the rows ``rows`` (None for a text-only batch), which real rows loaded, and ``key -> message``
    for those that failed. Thread-safe (no tokenizer): the runner prefetches with it. Anyres configs give
    ``[b, max crops, 3, S, S]`` (crops beyond an image's own are zeros) and each row's (height, width); failed
    and dummy rows get the batch's first image size (their prompt is the first item's)."""
    anyres = isinstance(img_cfg, ANYRES)
    video = isinstance(img_cfg, vid.VideoEvalConfig) and batch.items[0].question.video is not None
    px = sizes = None
    if batch.n_images:
        shape = (img_cfg.max_crops, 3, image_size, image_size) if anyres else (3, image_size, image_size)
        if video:
            shape = (img_cfg.num_frames, 3, image_size, image_size)
        px = np.zeros((len(rows),) + shape, np.float32)
        if anyres:
            sizes = np.zeros((len(rows), 2), np.int64)
    loaded = np.zeros(len(rows), bool)
    errors: dict[str, str] = {}
    for j, r in enumerate(rows):
        if r >= len(batch.items):
            continue
        q = batch.items[r].question
        if batch.n_images:
            try:
                got = vid.load_video_pixels(q, img_cfg) if video else load_pixels(q, img_cfg)
            except ItemError as e:
                errors[q.key] = str(e)
                continue
            if anyres:
                crops, hw = got
                if img_cfg.num_image_tokens(*hw) != batch.items[r].image_tokens:
                    errors[q.key] = (f"question {q.key!r}: the image's decoded size {hw} gives "
                                     f"{img_cfg.num_image_tokens(*hw)} tokens, its header planned "
                                     f"{batch.items[r].image_tokens}")
                    continue
                px[j, : crops.shape[0]] = crops
                sizes[j] = hw
            else:
                px[j] = got
        loaded[j] = True
    if sizes is not None:  # failed / dummy rows: the dummy prompt's image size
        first = _first_size(batch, img_cfg)
        sizes[~loaded] = first
    return LoadedImages(px, loaded, errors, sizes)


def _first_size(batch: Batch, img_cfg: AnyresProcessorConfig) -> tuple[int, int]:
    """An image size whose anyres token count equals the batch's first item's (the dummy rows' prompt)."""
    try:
        hw = image_hw(batch.items[0].question)
        if img_cfg.num_image_tokens(*hw) == batch.items[0].image_tokens:
            return hw
    except Exception:  # noqa: BLE001
        pass
    S = img_cfg.crop_size
    for h, w in img_cfg.pinpoints_hw:  # a size of every pinpoint: no unpadding, the pinpoint's full count
        if img_cfg.num_image_tokens(h, w) == batch.items[0].image_tokens:
            return h, w
    return S, S


def build_rows(batch: Batch, rows: range, tokenizer: Any, image_token_index: int, tokens_per_image: int,
               img_cfg: ImageProcessorConfig | AnyresProcessorConfig, image_size: int,
               images: LoadedImages | None = None) -> Rows:
    """Tokenize and load the rows ``rows`` (global row indices) of ``batch``; failed / dummy rows become the
    batch's first prompt with a blank (zero = mean colour) image and ``ok=False``. ``images``: the result of
    :func:`load_batch_images` if already loaded. Each image is expanded to its item's placeholder count
    (``tokens_per_image`` for fixed-size models)."""
    T = batch.length
    dummy = batch.items[0]
    video = isinstance(img_cfg, vid.VideoEvalConfig) and dummy.question.video is not None
    if images is None:
        images = load_batch_images(batch, rows, img_cfg, image_size)
    px, ok, errors = images.pixel_values, images.loaded, images.errors
    ids = np.full((len(rows), T), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for j, r in enumerate(rows):
        src = batch.items[r] if ok[j] else dummy
        if not ok[j] and px is not None:
            px[j] = 0.0
        k = src.image_tokens or tokens_per_image
        token, token_id = IMAGE_TOKEN, image_token_index
        if video:
            from jaxprune.processing_video import VIDEO_TOKEN

            token, token_id = VIDEO_TOKEN, img_cfg.video_token_index
        enc = tokenize_prompts(tokenizer, [src.prompt], token_id, k, image_token=token)["input_ids"][0]
        if len(enc) != src.length:
            raise ConfigError(f"question {src.question.key!r}: {len(enc)} tokens after expanding {token!r}, "
                              f"{src.length} when planned: the tokenizer must treat {token!r} as one special "
                              "token")
        ids[j, T - len(enc):] = enc
        mask[j, T - len(enc):] = 1
    if video:
        return Rows(ids, mask, None, np.asarray(ok, bool), errors, None, pixel_values_videos=px)
    srcs = [batch.items[r] if ok[j] else dummy for j, r in enumerate(rows)]
    return Rows(ids, mask, px, np.asarray(ok, bool), errors, images.image_sizes,
                reducer_inputs=stack_reducer_inputs([it.question for it in srcs]))


def stack_reducer_inputs(questions: Sequence[Question]) -> dict[str, np.ndarray] | None:
    """``{name: [b, P]}`` from each question's ``metadata["reducer_inputs"]`` (a benchmark that supplies them, such
    as synthvqa's ``patch_prior``, sets them on every question); None when no question has any."""
    per = [q.metadata.get(REDUCER_INPUTS) for q in questions]
    if all(p is None for p in per):
        return None
    if any(p is None for p in per):
        missing = next(q.key for q, p in zip(questions, per) if p is None)
        raise ConfigError(f"question {missing!r} has no metadata[{REDUCER_INPUTS!r}] while others of its batch do")
    names = sorted(per[0])
    return {n: np.stack([np.asarray(p[n], np.float32) for p in per]) for n in names}
