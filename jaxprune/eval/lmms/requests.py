"""lmms-eval requests -> what the engine runs: prompts, images, generation settings, stop strings, continuations.

Pure host code, no lmms-eval import (the adapter in :mod:`jaxprune.eval.lmms.model` unpacks ``Instance.args``).

* Prompt: the same as ``jaxprune-eval`` (:func:`jaxprune.processing.build_vicuna_v1_prompt`, LLaVA's
  ``vicuna_v1``): ``<system> USER: <image>\\n{context} ASSISTANT:``; a context that already holds ``<image>``
  keeps it where it is (what lmms-eval's own LLaVA model does).
* Images: each request's ``doc_to_visual(doc)`` list; LLaVA-1.5 / LLaVA-NeXT take at most one image per request,
  never a video; anything else is an :class:`~jaxprune.eval.config.ItemError` naming the task and doc id.
* Generation: greedy; ``max_new_tokens`` from the task's ``generation_kwargs`` (else the model's default),
  ``until`` stop strings cut the decoded text at the earliest match (after EOS, which always stops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxprune.eval.config import ConfigError, ItemError
from jaxprune.processing import IMAGE_TOKEN, build_vicuna_v1_prompt

#: Families whose image preprocessing the plugin runs, and what each takes per request.
FAMILY_NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Greedy generation settings of one request (``max_new_tokens`` is static: it keys the compiled program)."""

    max_new_tokens: int
    until: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """One ``generate_until`` request: the text context, its images (PIL, at most one) and settings."""

    context: str
    images: tuple[Any, ...]
    settings: GenSettings
    where: str = ""          # "task <name> doc <id>" for error messages


@dataclasses.dataclass(frozen=True)
class LoglikRequest:
    """One ``loglikelihood`` request: log P(continuation | context, images)."""

    context: str
    continuation: str
    images: tuple[Any, ...]
    where: str = ""


def where(task: Any, doc_id: Any) -> str:
    """``"task pope doc 12"``: how every per-request error names its row."""
    return f"task {task} doc {doc_id}"


def gen_settings(gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int, eos_text: str | None = None,
                 where: str = "") -> tuple[GenSettings, list[str]]:
    """``(settings, warnings)`` from a task's ``generation_kwargs``. ``until``: a string or a list of strings
    (lmms-eval's convention); ``max_new_tokens`` a positive int. Sampling settings (``temperature > 0``,
    ``do_sample``, ``num_beams > 1``) are reported in ``warnings``: decoding is always greedy."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until", [])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ConfigError(f"{where}: generation_kwargs until={until!r}: expected a string or a list of strings")
    n = kw.get("max_new_tokens", default_max_new_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{where}: generation_kwargs max_new_tokens={n!r}: expected a positive integer")
    warnings = []
    if float(kw.get("temperature", 0) or 0) > 0 or kw.get("do_sample") is True:
        warnings.append(f"temperature={kw.get('temperature')}, do_sample={kw.get('do_sample')}: decoding is greedy")
    if int(kw.get("num_beams", 1) or 1) > 1:
        warnings.append(f"num_beams={kw['num_beams']}: decoding is greedy (one beam)")
    stops = tuple(dict.fromkeys(u for u in until if u and u != eos_text))
    return GenSettings(int(n), stops), warnings


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (the stop string itself removed)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def check_visuals(visuals: Any, model_type: str, where: str) -> tuple[Any, ...]:
    """The request's images as a tuple of PIL images (0 or 1 of them); :class:`ItemError` naming ``where`` for a
    video, a non-image, or more images than the family takes."""
    from PIL import Image

    if visuals is None:
        return ()
    if isinstance(visuals, (str, bytes, dict)) or not isinstance(visuals, Sequence):
        visuals = [visuals]
    family = FAMILY_NAMES.get(model_type, model_type)
    items = [v for v in visuals if v is not None]
    for v in items:
        if isinstance(v, str):
            raise ItemError(f"{where}: a video or file path ({v!r}); the jaxprune lmms-eval model takes images only "
                            f"({family}, model_type {model_type!r})")
        if not isinstance(v, Image.Image):
            raise ItemError(f"{where}: a visual of type {type(v).__name__} (audio, video frames?); the jaxprune "
                            f"lmms-eval model takes PIL images only ({family})")
    if len(items) > 1:
        raise ItemError(f"{where}: {len(items)} images; {family} (model_type {model_type!r}) takes one image per "
                        "request")
    return tuple(items)


def chat_prompt(context: str, n_images: int, where: str = "", model_type: str = "llava") -> str:
    """The prompt of ``jaxprune-eval``: vicuna_v1 (LLaVA-1.5 / NeXT) or, for ``llava_onevision``, the model card's
    Qwen2 chat template; ``<image>\\n`` before the context when it has an image and the context does not place
    ``<image>`` itself."""
    k = context.count(IMAGE_TOKEN)
    if k and k != n_images:
        raise ItemError(f"{where}: the context holds {k} {IMAGE_TOKEN!r} but the request has {n_images} image(s)")
    with_image = n_images > 0 and not k
    if model_type == "llava_onevision":
        from jaxprune.processing_onevision import build_prompt

        return build_prompt(context, images=int(with_image))
    return build_vicuna_v1_prompt(context, with_image=with_image)


def continuation_text(prompt: str, continuation: str) -> str:
    """Prompt + continuation as one string: the continuation follows ``ASSISTANT:`` after one space, as the
    assistant's turn does in vicuna_v1 (a continuation that starts with whitespace, e.g. lmms-eval's multiple
    choice ``" A"``, is appended as it is)."""
    if not continuation:
        return prompt
    return prompt + (continuation if continuation[:1].isspace() else " " + continuation)


def split_continuation(ctx_ids: Sequence[int], full_ids: Sequence[int], where: str = "") -> int:
    """Where the continuation's tokens start in ``full_ids``: the length of the common prefix with ``ctx_ids``
    (equal to ``len(ctx_ids)`` unless a token spans the boundary). ItemError if nothing is left to score."""
    n = 0
    for a, b in zip(ctx_ids, full_ids):
        if a != b:
            break
        n += 1
    if n >= len(full_ids):
        raise ItemError(f"{where}: the continuation adds no token to the context")
    return n
