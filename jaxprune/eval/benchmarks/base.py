"""Common types of the benchmark package: :class:`Question`, the :class:`Benchmark` protocol, errors and the registry.

Conventions shared by every benchmark module
--------------------------------------------
* ``Question.text`` is the text LLaVA's eval scripts put right after ``<image>\\n`` in the user turn, task suffix
  included (``\\nAnswer the question using a single word or phrase.`` / ``\\nAnswer with the option's letter from
  the given choices directly.``).  For ``model_vqa_loader.py`` benchmarks it is the question file's ``text``
  verbatim; for ScienceQA / MMBench it is what ``model_vqa_science.py`` / ``model_vqa_mmbench.py`` build
  (haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd).  The ``<image>`` token itself is never part of it.
* ``Question.key`` is unique within a loaded benchmark.  It is ``str(question_id)`` except where LLaVA's question
  files repeat a ``question_id`` (MME: one id per image for its two questions; TextVQA: the id is the image id), where
  the n-th occurrence gets ``f"{question_id}#{n}"``.  ``score`` / ``write_submission`` take answers keyed by it
  (a plain ``question_id`` key is accepted too when ids are unique).  :func:`jaxprune.eval.benchmarks.files.match_answers`
  turns a LLaVA answers jsonl into such a mapping (disambiguating repeated ids by the recorded prompt).
* Accuracy-type metrics are percentages (0-100); MME subtask scores are the official points (acc + acc+, max 200).
* A question without an answer is scored as if the model had answered ``""`` (each benchmark's parser then decides,
  e.g. POPE's parser turns ``""`` into "yes"), and ``n_missing`` reports how many there were; ``strict=True`` raises
  instead.
"""

from __future__ import annotations

import base64
import importlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jaxprune.errors import JaxpruneError

#: The two harness protocols every built-in image benchmark offers: LLaVA's official prompts + scorer, or lmms-eval's
#: task (``doc_to_text`` + ``process_results`` + aggregation).  Some benchmarks offer more scorer variants (VQAv2).
PROTOCOLS = ("llava", "lmms_eval")
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


class BenchmarkFormatError(JaxpruneError, ValueError):
    """A benchmark file is malformed; the message names the file and, where known, the line or row."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


class UnknownBenchmarkError(JaxpruneError, ValueError):
    """``get_benchmark`` was given a name that is not registered."""


class MissingAnswersError(JaxpruneError, ValueError):
    """``score(..., strict=True)`` found questions without an answer."""


@dataclass(frozen=True)
class EmbeddedImage:
    """An encoded image held inside a data file (an lmms-lab parquet / arrow row): its bytes and where they came from
    (``"<file>: row N, column 'image'"``, for error messages)."""

    data: bytes = field(repr=False)
    where: str = ""

    def open(self) -> Any:
        """The image, loaded with PIL (no mode conversion)."""
        from PIL import Image

        img = Image.open(io.BytesIO(self.data))
        img.load()
        return img


@dataclass
class Question:
    """One benchmark question, as LLaVA's evaluation feeds it to the model.

    Attributes:
        question_id: the id exactly as in the source file (int or str).
        text: user text after ``<image>\\n``, task suffix included (see module docstring).
        image: image file relative to ``image_root`` (None for text-only ScienceQA items and for MMBench, whose images
            are base64 in the TSV: see ``image_b64``).
        answers: ground truth; one item for most benchmarks, the 10 human answers for VQAv2 / TextVQA, empty when
            unknown (test splits).
        category: POPE split, MME subtask, MMBench category, SEED question type name, ScienceQA subject...
        split: a second grouping where the benchmark has one (SEED ``data_type`` image/video, VQA answer type...).
        options: multiple-choice options ``{"A": ..., "B": ...}``.
        metadata: everything else the scorer or a submission writer needs (raw record fields).
        image_root: folder the ``image`` path is relative to.
        image_b64: base64-encoded image (MMBench).
        answer_file_prompt: the ``prompt`` field LLaVA writes into its answers jsonl when it differs from ``text``
            (ScienceQA: ``<image>\\n`` prefix; MMBench: no suffix).
        key: unique key within the benchmark (defaults to ``str(question_id)``).
        image_blob: the image embedded in a dataset file (lmms-lab parquet / arrow layouts).
        video: video file relative to ``image_root`` (video benchmarks: the model gets the video instead of an
            image; ``text`` is then what follows ``<video>\\n``).
    """

    question_id: int | str
    text: str
    image: str | None = None
    answers: list[str] = field(default_factory=list)
    category: str | None = None
    split: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    image_root: str | None = None
    image_b64: str | None = None
    answer_file_prompt: str | None = None
    key: str = ""
    image_blob: EmbeddedImage | None = None
    video: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            self.key = str(self.question_id)

    @property
    def answer(self) -> str | None:
        """The first ground-truth answer (None when unknown)."""
        return self.answers[0] if self.answers else None

    @property
    def record_prompt(self) -> str:
        """The ``prompt`` value LLaVA's answer writers record for this question."""
        return self.answer_file_prompt if self.answer_file_prompt is not None else self.text

    @property
    def has_image(self) -> bool:
        """Whether the question comes with an image (file, base64 or embedded)."""
        return self.image is not None or self.image_b64 is not None or self.image_blob is not None

    @property
    def image_source(self) -> str | None:
        """Where the image is read from, for messages: its file, ``"embedded base64 image"``, or the data file + row."""
        if self.image_blob is not None:
            return self.image_blob.where or "embedded image"
        if self.image_b64 is not None:
            return "embedded base64 image"
        path = self.image_path
        return None if path is None else f"image file {path}"

    @property
    def image_path(self) -> Path | None:
        """Full image path (None when the question has no image file)."""
        if self.image is None:
            return None
        return Path(self.image_root) / self.image if self.image_root else Path(self.image)

    @property
    def video_path(self) -> Path | None:
        """Full video path (None for a question without a video)."""
        if self.video is None:
            return None
        return Path(self.image_root) / self.video if self.image_root else Path(self.video)

    def load_image(self) -> Any:
        """Open the image with PIL (no mode conversion: callers decide, as LLaVA's scripts differ on ``.convert``)."""
        from PIL import Image

        if self.image_blob is not None:
            return self.image_blob.open()
        if self.image_b64 is not None:
            img = Image.open(io.BytesIO(base64.b64decode(self.image_b64)))
            img.load()
            return img
        path = self.image_path
        if path is None:
            raise ValueError(f"question {self.key!r} has no image")
        img = Image.open(path)
        img.load()
        return img


@runtime_checkable
class Benchmark(Protocol):
    """What every benchmark offers."""

    name: str

    def load(self, root: str | Path, **kwargs: Any) -> list[Question]:
        """Read the questions (LLaVA question file or the raw official format) under ``root``."""
        ...

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], **kwargs: Any) -> dict[str, Any]:
        """Metric name -> value (percent), plus per-category breakdowns, following the official scorer."""
        ...

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **kwargs: Any) -> Path:
        """Write the file the official server / tool expects (raises where the benchmark has none)."""
        ...


class BenchmarkBase:
    """Shared helpers; concrete benchmarks subclass it and set ``name``."""

    name: str = ""
    layout: str = ""             # the files ``load`` expects under the data root (shown by ``jaxprune-eval --help``)
    layout_lmms: str = ""        # the lmms-lab dataset ``load`` also reads (parquet / datasets cache / save_to_disk)
    has_submission: bool = False
    protocols: tuple[str, ...] = ("llava",)  # what ``load(protocol=...)`` / ``score(protocol=...)`` accept
    scorers: dict[str, str] = {}             # protocol -> the scorer it reproduces (reported with every score)

    def load(self, root: str | Path, **kwargs: Any) -> list[Question]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, questions: Sequence[Question], answers: Mapping[Any, str], **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name}: no local scorer")  # pragma: no cover - overridden

    def write_submission(self, questions: Sequence[Question], answers: Mapping[Any, str], path: str | Path,
                         **kwargs: Any) -> Path:
        raise NotImplementedError(f"{self.name} has no submission format (it is scored locally)")

    def __repr__(self) -> str:
        return f"<benchmark {self.name}>"


def assign_keys(questions: list[Question]) -> list[Question]:
    """Give repeated question ids the keys ``f"{id}#{n}"`` (n-th occurrence, file order); unique ids keep
    ``str(id)``."""
    counts: dict[str, int] = {}
    for q in questions:
        counts[str(q.question_id)] = counts.get(str(q.question_id), 0) + 1
    seen: dict[str, int] = {}
    for q in questions:
        qid = str(q.question_id)
        if counts[qid] > 1:
            n = seen.get(qid, 0)
            seen[qid] = n + 1
            q.key = f"{qid}#{n}"
        else:
            q.key = qid
    return questions


def lookup_answer(answers: Mapping[Any, str], q: Question) -> str | None:
    """The answer for ``q``: by ``q.key``, else by its raw ``question_id`` (only meaningful when ids are unique)."""
    if q.key in answers:
        return answers[q.key]
    if q.key == str(q.question_id) and q.question_id in answers:
        return answers[q.question_id]
    return None


def collect_answers(questions: Sequence[Question], answers: Mapping[Any, str], strict: bool = False,
                    benchmark: str = "") -> tuple[list[str], int]:
    """Answer text per question (``""`` where missing) and the number missing; ``strict`` raises on any missing."""
    out: list[str] = []
    missing: list[str] = []
    for q in questions:
        a = lookup_answer(answers, q)
        if a is None:
            missing.append(q.key)
            a = ""
        out.append(str(a))
    if strict and missing:
        head = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingAnswersError(f"{benchmark}: {len(missing)} of {len(questions)} questions have no answer ({head})")
    return out, len(missing)


def check_protocol(benchmark: str, protocol: str, allowed: Sequence[str] = PROTOCOLS) -> str:
    """``protocol`` if ``benchmark`` offers it, else a ValueError listing the choices."""
    if protocol not in allowed:
        raise ValueError(f"{benchmark}: unknown protocol {protocol!r}; choose from {', '.join(allowed)}")
    return protocol


def scoring_protocol(benchmark: str, questions: Sequence[Question], protocol: str | None,
                     allowed: Sequence[str] = PROTOCOLS) -> str:
    """The protocol to score with: ``protocol`` if given, else the one the questions were loaded with
    (``metadata["protocol"]``; ``"llava"`` when unset)."""
    if protocol is None:
        found = {q.metadata.get("protocol") for q in questions} - {None}
        if len(found) > 1:
            raise ValueError(f"{benchmark}: questions loaded with different protocols {sorted(found)}")
        protocol = found.pop() if found else "llava"
    return check_protocol(benchmark, protocol, allowed)


def tag_protocol(questions: list[Question], protocol: str) -> list[Question]:
    """Record the protocol the questions were built for (the scorer's default)."""
    for q in questions:
        q.metadata["protocol"] = protocol
    return questions


def pct(num: float, den: float) -> float:
    """``100 * num / den`` (0.0 when ``den`` is 0)."""
    return 100.0 * num / den if den else 0.0


# name -> (module, class); modules are imported on first use so that importing the package stays cheap.
_REGISTRY: dict[str, tuple[str, str]] = {
    "vqav2": ("vqav2", "VQAv2"),
    "gqa": ("gqa", "GQA"),
    "textvqa": ("textvqa", "TextVQA"),
    "pope": ("pope", "POPE"),
    "mme": ("mme", "MME"),
    "scienceqa": ("scienceqa", "ScienceQA"),
    "mmbench": ("mmbench", "MMBench"),
    "seed": ("seed", "SEEDBench"),
    "mmvet": ("mmvet", "MMVet"),
    "synthvqa": ("synthvqa", "SynthVQA"),
    "msvd_qa": ("video_qa", "MSVDQA"),
    "msrvtt_qa": ("video_qa", "MSRVTTQA"),
    "tgif_qa": ("video_qa", "TGIFQA"),
    "activitynet_qa": ("video_qa", "ActivityNetQA"),
    "videomme": ("videomme", "VideoMME"),
}
_ALIASES = {"sqa": "scienceqa", "scienceqa_img": "scienceqa", "seedbench": "seed", "seed_bench": "seed",
            "mm_vet": "mmvet", "vqa_v2": "vqav2", "mmbench_en": "mmbench",
            "synth_vqa": "synthvqa", "msvd": "msvd_qa", "msrvtt": "msrvtt_qa", "tgif": "tgif_qa",
            "activitynet": "activitynet_qa", "anet_qa": "activitynet_qa", "video_mme": "videomme"}


def list_benchmarks() -> list[str]:
    """Registered benchmark names."""
    return list(_REGISTRY)


def get_benchmark(name: str) -> BenchmarkBase:
    """A new instance of the benchmark called ``name`` (case-insensitive; ``-`` and ``_`` are interchangeable)."""
    norm = name.strip().lower().replace("-", "_")
    norm = _ALIASES.get(norm, norm)
    if norm not in _REGISTRY:
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(_REGISTRY)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})")
    module, cls = _REGISTRY[norm]
    mod = importlib.import_module(f"{__package__}.{module}")
    return getattr(mod, cls)()
