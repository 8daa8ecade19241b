"""Video rows of the eval harness (Video-LLaVA): the model's video settings, prompts, pixels, pre-flight checks.

A Video-LLaVA model (``model_type="video_llava"``) evaluates video benchmarks (questions with ``Question.video``):

* prompt :func:`jaxprune.processing_video.build_prompt` (``USER: <video>\\n{question} ASSISTANT:``), the ``<video>``
  expanded to ``num_frames * tokens_per_frame`` ids ``video_token_index`` (``VideoLlavaProcessor``'s expansion);
* pixels ``[F, 3, S, S]`` per row (``pixel_values_videos``): PyAV decoding, ``np.linspace(0, n - 1, F, dtype=int)``
  frames, each frame resized / centre-cropped to the model's ``image_size`` and CLIP-normalised
  (:mod:`jaxprune.processing_video`);
* a missing, unreadable or truncated file, or one with fewer than ``F`` frames: :class:`ItemError` naming the
  question and the file.

The rest (length-sorted static batches, resume, efficiency, reports) is the image path's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.eval.benchmarks import Question
from jaxprune.processing import ImageProcessorConfig

from .config import ConfigError, ItemError

PROMPT_FORMAT = "USER: <video>\\n{question} ASSISTANT: (Video-LLaVA eval) + HF <video> expansion"


@dataclasses.dataclass(frozen=True)
class VideoEvalConfig:
    """How the harness feeds videos to a Video-LLaVA model (the ``img_cfg`` of its :class:`Context`)."""

    num_frames: int                 # frames sampled per video (the model's num_frames)
    tokens_per_video: int           # <video> placeholders: num_frames * (1 + patches)
    video_token_index: int
    frame_cfg: ImageProcessorConfig  # per-frame resize / crop / normalisation
    prompt_format: str = PROMPT_FORMAT

    @property
    def max_tokens(self) -> int:
        """Placeholder tokens of one video row (what the batch planner adds per visual)."""
        return self.tokens_per_video

    @classmethod
    def from_model(cls, cfg: Any, model_dir: str | Path | None = None) -> VideoEvalConfig:
        """From the model config (+ ``preprocessor_config.json`` where it names the crop / resize sizes)."""
        from jaxprune.processing_video import FRAME_CFG

        s = cfg.vision.image_size
        frame = dataclasses.replace(FRAME_CFG, image_size=s, shortest_edge=s)
        pp = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
        if pp is not None and pp.is_file():
            try:
                d = json.loads(pp.read_text())
                frame = ImageProcessorConfig.from_hf_preprocessor_config(d, mode="crop")
            except (json.JSONDecodeError, ValueError) as e:
                raise ConfigError(f"{pp}: {e}") from None
            if frame.image_size != s:
                raise ConfigError(f"{pp}: crop size {frame.image_size} differs from the model's image_size {s}")
        return cls(int(cfg.num_frames), int(cfg.tokens_per_video), int(cfg.video_token_index), frame)


def is_video_model(cfg: Any) -> bool:
    """Whether the model takes ``pixel_values_videos`` (Video-LLaVA)."""
    return getattr(cfg, "video_token_index", None) is not None and cfg.model_type == "video_llava"


def check_questions(questions: Sequence[Question], vcfg: Any, model_type: str, benchmark: str) -> None:
    """Video questions need a video model and a video model takes only video questions here: :class:`ConfigError`
    naming the benchmark, the model type and the first offending question."""
    video = isinstance(vcfg, VideoEvalConfig)
    for q in questions:
        if q.video is not None and not video:
            raise ConfigError(f"{benchmark}: question {q.key!r} is a video question but the model "
                              f"(model_type {model_type!r}) has no video input; use a Video-LLaVA checkpoint "
                              "(model_type 'video_llava')")
        if q.video is None and video:
            raise ConfigError(f"{benchmark}: question {q.key!r} has no video; the harness runs Video-LLaVA models "
                              "on video benchmarks only")


def check_tokenizer(tokenizer: Any, vcfg: VideoEvalConfig) -> None:
    """``<video>`` must be one token with the model's ``video_token_index``."""
    from jaxprune.processing_video import VIDEO_TOKEN

    tid = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if tid != vcfg.video_token_index:
        raise ConfigError(f"the tokenizer maps {VIDEO_TOKEN!r} to id {tid}, the model expects "
                          f"{vcfg.video_token_index} (video_token_index): use the tokenizer saved with the model "
                          "(--tokenizer DIR)")


def prompt(q: Question) -> str:
    """The question's Video-LLaVA prompt (one ``<video>``)."""
    from jaxprune.processing_video import build_prompt

    return build_prompt(q.text)


def load_video_pixels(q: Question, vcfg: VideoEvalConfig) -> np.ndarray:
    """``[F, 3, S, S]`` float32 of the question's video; :class:`ItemError` naming the question and the file."""
    from jaxprune.inputs import InputError
    from jaxprune.processing_video import preprocess_frames, read_video

    path = q.video_path
    if path is None or not path.is_file():
        return _missing(q)
    try:
        return preprocess_frames(read_video(path, vcfg.num_frames), vcfg.frame_cfg)
    except InputError as e:
        raise ItemError(f"question {q.key!r}: {e}") from None
    except ImportError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - frame conversion errors of damaged streams
        raise ItemError(f"question {q.key!r}: cannot decode video file {path}: {type(e).__name__}: {e}") from None


def missing_message(q: Question) -> str:
    """``question 'k': video file not found: PATH (also tried ...)``."""
    tried = [c for c in q.metadata.get("video_candidates", []) if c != q.video]
    more = f" (also tried {', '.join(tried)})" if tried else ""
    return f"question {q.key!r}: video file not found: {q.video_path}{more}"


def _missing(q: Question) -> np.ndarray:
    raise ItemError(missing_message(q))
