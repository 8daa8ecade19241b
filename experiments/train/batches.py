"""Training batches for LLaVA-style supervised fine-tuning: conversations -> ids, labels, padding.

A conversation is LLaVA's instruction format (``[{"from": "human"|"gpt", "value": ...}, ...]``, the first
human turn holding ``<image>``). It is rendered with the vicuna_v1 template exactly as LLaVA trains
(``conv_templates["vicuna_v1"]``, SeparatorStyle.TWO): ``SYSTEM USER: h1 ASSISTANT: a1</s>USER: h2
ASSISTANT: a2</s>``; the single-turn prompt up to ``ASSISTANT:`` is what
:func:`jaxprune.processing.build_vicuna_v1_prompt` gives at evaluation time. ``<image>`` is expanded to one
id per visual token (HF convention), the whole string is tokenized once, and the loss covers the tokens of
every assistant answer plus its ``</s>`` (found through the tokenizer's character offsets, so any fast
tokenizer works). Labels are next-token targets: ``labels[t] = ids[t + 1]`` where token ``t + 1`` is
an answer token, else -1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.processing import IMAGE_TOKEN, VICUNA_V1_SYSTEM, expand_image_tokens

EOS_TEXT = "</s>"


@dataclass(frozen=True)
class Conversation:
    image: str | None                   # image path relative to the image folder
    turns: tuple[tuple[str, str], ...]  # (human, assistant); the human text of the first turn holds <image>


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray   # [B, T] int32
    valid: np.ndarray       # [B, T] bool (right padding)
    positions: np.ndarray   # [B, T] int32
    labels: np.ndarray      # [B, T] int32, -1 = no loss


def render_conversation(turns: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The vicuna_v1 training string and the character spans of the answers (each with its ``</s>``)."""
    if not turns:
        raise ValueError("a conversation needs at least one (human, assistant) turn")
    text, spans = VICUNA_V1_SYSTEM + " ", []
    for human, answer in turns:
        text += "USER: " + human + " ASSISTANT: "
        start = len(text)
        text += answer + EOS_TEXT
        spans.append((start, len(text)))
    return text, spans


def encode(tokenizer: Any, turns: Sequence[tuple[str, str]], image_token_id: int,
           num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [L], labels [L])`` for one conversation (see the module docstring)."""
    text, spans = render_conversation(turns)
    n_img = text.count(IMAGE_TOKEN)
    # Expand <image> and shift the answer spans by the inserted characters.
    grow = len(IMAGE_TOKEN) * (num_image_tokens - 1)
    starts = [text.find(IMAGE_TOKEN, 0)] if n_img else []
    for _ in range(n_img - 1):
        starts.append(text.find(IMAGE_TOKEN, starts[-1] + 1))
    def shift(c: int) -> int:
        return c + grow * sum(s < c for s in starts)
    spans = [(shift(a), shift(b)) for a, b in spans]
    enc = tokenizer(expand_image_tokens(text, num_image_tokens) if n_img else text,
                    return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    if int((ids == image_token_id).sum()) != n_img * num_image_tokens:
        raise ValueError(f"expected {n_img * num_image_tokens} image tokens (id {image_token_id}), got "
                         f"{int((ids == image_token_id).sum())}: is <image> a special token of the tokenizer?")
    is_answer = np.zeros(len(ids), bool)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a >= s and b <= e for s, e in spans):
            is_answer[i] = True
    if not is_answer.any():
        raise ValueError("no answer tokens found (empty answers?)")
    labels = np.full(len(ids), -1, np.int32)
    labels[:-1] = np.where(is_answer[1:], ids[1:], -1)
    return ids, labels


def collate(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int = 0, bucket: int = 32,
            length: int | None = None) -> Batch:
    """Right-pad to ``length`` (default: the longest row rounded up to ``bucket``)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    longest = max(len(r[0]) for r in rows)
    t = length if length is not None else -(-longest // bucket) * bucket
    if t < longest:
        raise ValueError(f"length {t} is shorter than the longest row ({longest} tokens)")
    ids = np.full((len(rows), t), pad_id, np.int32)
    labels = np.full((len(rows), t), -1, np.int32)
    valid = np.zeros((len(rows), t), bool)
    for i, (r, lab) in enumerate(rows):
        ids[i, :len(r)], labels[i, :len(r)], valid[i, :len(r)] = r, lab, True
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (len(rows), t)).copy()
    return Batch(ids, valid, positions, labels)


def read_llava_instructions(path: str | Path) -> list[Conversation]:
    """LLaVA instruction JSON (``llava_v1_5_mix665k.json`` style): a list of ``{"id", "image"?,
    "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` with alternating turns."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read LLaVA instruction JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    out = []
    for n, rec in enumerate(data):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list) or not conv or len(conv) % 2:
            raise ValueError(f"{path}: record {n}: 'conversations' must be a non-empty list of human/gpt pairs")
        turns = []
        for j in range(0, len(conv), 2):
            h, g = conv[j], conv[j + 1]
            if h.get("from") != "human" or g.get("from") != "gpt":
                raise ValueError(f"{path}: record {n}: turn {j // 2} is not a human/gpt pair")
            turns.append((str(h["value"]), str(g["value"])))
        image = rec.get("image")
        if image is not None and IMAGE_TOKEN not in turns[0][0]:
            turns[0] = (IMAGE_TOKEN + "\n" + turns[0][0], turns[0][1])
        out.append(Conversation(image, tuple(turns)))
    return out
