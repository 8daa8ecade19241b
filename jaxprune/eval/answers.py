"""The resumable answers file: LLaVA's answers jsonl plus our question ``key``, appended one batch at a time.

Each line is what ``llava/eval/model_vqa_loader.py`` writes (``question_id, prompt, text, answer_id, model_id,
metadata``) plus ``key`` (:attr:`Question.key`, unique even where LLaVA's ids repeat).  Crash safety:

* a batch's lines are joined and written with one ``write`` call on an ``O_APPEND`` descriptor, then
  ``fsync``-ed: a crash loses at most the batch in flight;
* on resume a trailing partial line (no final newline: the crash hit mid-write) is truncated away, and a key that
  is already present is never written again;
* ``answer_id`` is a hash of (model id, run, key), not a random uuid, so a resumed run and an uninterrupted one
  produce byte-identical files;
* when a run completes, :meth:`AnswerFile.finalize` rewrites the file in question-file order (temp file +
  ``os.replace``), the order LLaVA's own scorers (e.g. ``eval_pope.py``, which zips answers with labels) expect.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxprune.eval.benchmarks import Question

from .config import ItemError


def answer_id(model_id: str, key: str) -> str:
    """Deterministic 22-character id (LLaVA uses a random ``shortuuid``; only uniqueness matters)."""
    return hashlib.sha1(f"{model_id}\0{key}".encode()).hexdigest()[:22]


def make_record(q: Question, text: str, model_id: str) -> dict[str, Any]:
    return {"question_id": q.question_id, "prompt": q.record_prompt, "text": text,
            "answer_id": answer_id(model_id, q.key), "model_id": model_id, "metadata": {}, "key": q.key}


class AnswerFile:
    """Append-only jsonl keyed by question key (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """``key -> record`` of the complete lines; a trailing partial line is truncated (``repair``) or ignored.

        A complete line that is not a JSON object with ``key`` and ``text`` is corruption we did not cause:
        :class:`ItemError` naming the file and line."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a partial line
        if end < len(data) and repair:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        out: dict[str, dict[str, Any]] = {}
        for lineno, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ItemError(f"{self.path}:{lineno}: corrupt answers line ({e.msg}); delete the line or the "
                                "file to re-run those questions") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("text"), str):
                raise ItemError(f"{self.path}:{lineno}: not an answers record of this harness (needs 'key' and "
                                "'text'); use a fresh --out folder")
            out.setdefault(rec["key"], rec)  # first occurrence wins; duplicates are never written by us
        return out

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` with a single write of the joined lines, then fsync."""
        if not records:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(payload)
            while view:  # one call in practice; loop only if the kernel returns a short write
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def finalize(self, order: Sequence[str]) -> None:
        """Rewrite in the given key order (keys not in ``order`` keep their relative order at the end)."""
        recs = self.load()
        wanted = dict.fromkeys(order)
        keys = [k for k in wanted if k in recs] + [k for k in recs if k not in wanted]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write("".join(json.dumps(recs[k], ensure_ascii=False) + "\n" for k in keys).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """JSON file written to a temp sibling and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
