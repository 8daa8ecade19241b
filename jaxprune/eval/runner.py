"""One run = one benchmark x one reducer spec: batched greedy generation, resumable answers, score, efficiency.

Per run folder (``OUT/<benchmark>/<run>/``, run = ``full`` or ``<reducer>_<budget>``):

* ``answers.jsonl``: LLaVA's answers format + ``key`` (see :mod:`jaxprune.eval.answers`), appended per batch,
  rewritten in question-file order when the run completes;
* ``run_config.json``: the settings that determine the answers (model id, reducer, max_new_tokens, prompt
  format, dtype, image mode); a re-run with different settings into the same folder is refused;
* ``run.json``: score, skipped items, efficiency, compile times (what the reports are built from);
* the benchmark's submission file where it has one (EvalAI / GQA eval.py / MME tool / MMBench sheet / ...).

A re-run skips every key already in ``answers.jsonl``.  Batches are planned over *all* questions and a batch is
skipped only if every row is done, so resumed and uninterrupted runs compute identical batches.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.eval.benchmarks import Question

from . import distributed as dist
from . import efficiency as eff
from .answers import AnswerFile, make_record, write_json_atomic
from .batching import (
    Batch,
    build_rows,
    check_tokenizer,
    load_batch_images,
    make_items,
    missing_image_files,
    plan_batches,
)
from . import video
from .config import ConfigError, EvalError, ItemError, ReducerSpec, default_max_new_tokens
from .engine import Engine

PROMPT_FORMAT = "vicuna_v1 + HF <image> expansion"

#: Headline metric per benchmark (the number LLaVA's tables report); None = scored by an external server/grader.
HEADLINE: dict[str, str | None] = {"pope": "f1", "gqa": "accuracy", "textvqa": "accuracy", "mme": "perception",
                                   "scienceqa": "img_accuracy", "mmbench": "circular_accuracy", "seed": "accuracy",
                                   "vqav2": "accuracy", "mmvet": None, "synthvqa": "accuracy",
                                   # video QA: the official metric is GPT-judged; the headline is a labelled proxy
                                   "msvd_qa": "proxy_accuracy_not_official", "msrvtt_qa": "proxy_accuracy_not_official",
                                   "tgif_qa": "proxy_accuracy_not_official",
                                   "activitynet_qa": "proxy_accuracy_not_official", "videomme": "accuracy"}
#: Submission file (relative to the run folder) per benchmark that has one.
SUBMISSION: dict[str, str] = {"vqav2": "vqav2_evalai_submission.json", "gqa": "testdev_balanced_predictions.json",
                              "mme": "mme_answers", "mmbench": "mmbench_submission.tsv",
                              "seed": "seed_submission.jsonl", "mmvet": "mmvet_submission.json"}


@dataclasses.dataclass
class Context:
    """A loaded model on its data mesh, shared by every run of a sweep."""

    model: Any
    tokenizer: Any
    model_id: str
    mesh: Any
    params: Any                  # replicated on ``mesh``
    img_cfg: Any                 # jaxprune.processing.ImageProcessorConfig
    eos_ids: tuple[int, ...]
    pad_id: int
    dtype: str
    image_mode: str
    cache: dict = dataclasses.field(default_factory=dict)  # compiled programs by (reducer, shape, ...)

    @classmethod
    def create(cls, model: Any, tokenizer: Any, model_id: str, *, num_devices: int | None = None,
               image_mode: str = "pad", model_dir: str | Path | None = None) -> Context:
        cfg = model.cfg
        check_tokenizer(tokenizer, cfg.image_token_index)
        img_cfg = image_processor(cfg, model_dir, image_mode)
        if isinstance(img_cfg, video.VideoEvalConfig):
            video.check_tokenizer(tokenizer, img_cfg)
        eos = tuple(cfg.text.eos_token_id or ())
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos = eos + (int(tokenizer.eos_token_id),)
        pad = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else (eos[0] if eos else 0)
        try:
            mesh = dist.make_mesh(num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        params = dist.replicate(model.params, mesh)
        if dist.process_count() == 1:
            # one copy only: the model itself (overlays, user calls) runs on the replicated parameters too.
            # Several processes keep the process-local original for process 0's overlays (a global array would
            # need every process in each call).
            model.params = params
        return cls(model, tokenizer, model_id, mesh, params, img_cfg, eos, int(pad), str(model.dtype), image_mode)


@dataclasses.dataclass
class RunOptions:
    batch_size: int = 8
    max_new_tokens: int | None = None   # None: LLaVA's default for the benchmark
    on_error: str = "stop"
    progress: bool = True
    timing_reps: int = 5
    after_batch: Callable[[int], None] | None = None  # test hook: called after each batch is written
    #: called with ``(spec, rows, global_rows, max_new_tokens)`` once the first batch's rows exist (the sweep's
    #: compile-ahead of the next spec, :mod:`jaxprune.eval.prefetch`), and before the run times anything
    first_rows: Callable[[ReducerSpec, Any, int, int], None] | None = None
    before_timing: Callable[[], None] | None = None


@dataclasses.dataclass
class RunResult:
    benchmark: str
    spec: ReducerSpec
    run_dir: Path
    record: dict[str, Any]    # the content of run.json

    @property
    def label(self) -> str:
        return self.spec.label


def make_reducer(spec: ReducerSpec, cfg: Any) -> Any:
    if spec.is_full:
        return None
    from jaxprune.reducers import registry

    try:
        return registry.make(spec.name, spec.budget, cfg)
    except ValueError as e:  # unknown name, BudgetError
        raise ItemError(f"reducer {spec.label}: {e}") from None


def check_reducer_benchmark(spec: ReducerSpec, bench_name: str) -> None:
    """Refuse a benchmark-only reducer (the synthvqa ``oracle``) on another benchmark, by name."""
    if spec.is_full:
        return
    from jaxprune.reducers import registry

    only = registry.benchmarks_of(spec.name)
    if only is not None and bench_name not in only:
        raise ItemError(f"reducer {spec.label} runs only on benchmark {', '.join(only)} (it reads per-question "
                        f"reducer_inputs only that benchmark supplies), not on {bench_name}")


def decode_answer(tokenizer: Any, ids: np.ndarray, eos_ids: Sequence[int]) -> str:
    """Tokens up to the first EOS, decoded with ``skip_special_tokens`` and stripped (LLaVA's eval scripts)."""
    ids = [int(t) for t in ids]
    for i, t in enumerate(ids):
        if t in eos_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _log(msg: str) -> None:
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def _pre_run(answers: AnswerFile, cfg_path: Path, fingerprint: dict, items
             ) -> tuple[np.ndarray, dict[str, str], dict[str, Any] | None]:
    """Process 0: resume state. Returns (status per item: 0 todo / 1 done / 2 missing image, pre-flight messages,
    previous run.json if its fingerprint matches)."""
    if cfg_path.exists():
        try:
            prev_cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            prev_cfg = None
        if prev_cfg != fingerprint:
            raise ConfigError(f"{cfg_path.parent}: holds answers made with different settings ({prev_cfg} vs "
                              f"{fingerprint}); use another --out folder or delete that run folder")
    else:
        write_json_atomic(cfg_path, fingerprint)
    done = answers.load()
    status = np.zeros(len(items), np.int8)
    for it in items:
        if it.question.key in done:
            status[it.index] = 1
    missing = missing_image_files([it for it in items if status[it.index] == 0])
    for it in items:
        if it.question.key in missing:
            status[it.index] = 2
    prev = None
    run_json = cfg_path.parent / "run.json"
    if run_json.exists():
        try:
            prev = json.loads(run_json.read_text())
        except json.JSONDecodeError:
            prev = None
    return status, missing, prev


def run_benchmark(ctx: Context, bench: Any, questions: Sequence[Question], spec: ReducerSpec, run_dir: str | Path,
                  opts: RunOptions) -> RunResult:
    """Evaluate ``questions`` of ``bench`` with reducer ``spec``; resumable (see module docstring)."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    main = dist.is_main()
    cfg = ctx.model.cfg
    video.check_questions(questions, ctx.img_cfg, cfg.model_type, bench.name)
    P = max_image_tokens(ctx)
    check_reducer_benchmark(spec, bench.name)
    reducer = make_reducer(spec, cfg)
    protocol = next((q.metadata["protocol"] for q in questions if "protocol" in q.metadata), "llava")
    max_new = opts.max_new_tokens or default_max_new_tokens(bench.name, protocol)
    n_dev = ctx.mesh.size
    B = -(-opts.batch_size // n_dev) * n_dev
    if B != opts.batch_size:
        _log(f"batch size {opts.batch_size} rounded up to {B} (a multiple of the {n_dev} devices)")
    run_model_id = f"{ctx.model_id}+{spec.label}"
    fingerprint = {"model_id": ctx.model_id, "benchmark": bench.name, "reducer": spec.label,
                   "reducer_spec": repr(reducer), "max_new_tokens": max_new,
                   "prompt": getattr(ctx.img_cfg, "prompt_format", PROMPT_FORMAT),
                   "dtype": ctx.dtype, "image_mode": ctx.image_mode,
                   **({"protocol": protocol} if protocol != "llava" else {})}   # lmms_eval prompts differ
    items = make_items(questions, ctx.tokenizer, P, ctx.img_cfg)
    answers = AnswerFile(run_dir / "answers.jsonl")

    # ---- resume state (process 0 reads, everyone receives)
    status = np.zeros(len(items) + 2, np.int8)  # [..items.., error flag, reuse-efficiency flag]
    pre_errors: dict[str, str] = {}
    prev: dict[str, Any] | None = None
    err: Exception | None = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            st, pre_errors, prev = _pre_run(answers, run_dir / "run_config.json", fingerprint, items)
            status[:-2] = st
            status[-1] = int(prev is not None and prev.get("fingerprint") == fingerprint
                             and "efficiency" in prev and bool((st != 0).all()))
        except EvalError as e:
            err, status[-2] = e, 1
    status = dist.broadcast(status)
    if status[-2]:
        raise err if err is not None else ItemError(f"{bench.name}/{spec.label}: process 0 could not read its run "
                                                    "folder (see its log)")
    reuse_timing = bool(status[-1])
    status = status[:-2]
    if (status == 2).any() and opts.on_error == "stop":
        keys = [it.question.key for it in items if status[it.index] == 2]
        first = pre_errors.get(keys[0], f"question {keys[0]!r}: image file not found")
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        raise ItemError(f"{bench.name}/{spec.label}: {first}{more}")

    batches = plan_batches([it for it in items if status[it.index] != 2], B)
    todo = [b for b in batches if any(status[it.index] == 0 for it in b.items)]
    engine = Engine(ctx.model, reducer, ctx.mesh, ctx.params, max_new, ctx.eos_ids, ctx.pad_id, ctx.cache)
    my_rows = dist.local_rows(ctx.mesh, B)
    skipped: dict[str, str] = dict(pre_errors)
    n_todo = int(sum(status[it.index] == 0 for b in todo for it in b.items))
    if main and n_todo < int((status != 2).sum()):
        _log(f"{bench.name}/{spec.label}: resuming, {int((status == 1).sum())} answers already in {answers.path}")
    pbar = _progress(n_todo, f"{bench.name}/{spec.label}", main and opts.progress)

    def load(batch: Batch):
        return load_batch_images(batch, my_rows, ctx.img_cfg, cfg.vision.image_size)

    # image decoding + preprocessing of batch i+1 overlaps generation of batch i (the tokenizer stays on this
    # thread: HF fast tokenizers are not safe to share between threads)
    pool = ThreadPoolExecutor(1)
    try:
        nxt = pool.submit(load, todo[0]) if todo else None
        for bi, batch in enumerate(todo):
            images = nxt.result()
            if bi + 1 < len(todo):
                nxt = pool.submit(load, todo[bi + 1])
            rows = build_rows(batch, my_rows, ctx.tokenizer, cfg.image_token_index, P, ctx.img_cfg,
                              cfg.vision.image_size, images)
            if bi == 0 and opts.first_rows is not None:
                opts.first_rows(spec, rows, B, max_new)
            tokens = engine.generate(_prepare(engine, rows, B, f"{bench.name}/{spec.label}"))
            ok = dist.gather_rows(rows.ok)
            failed = []
            records = []
            for r, it in enumerate(batch.items):
                key = it.question.key
                if status[it.index] != 0:  # answered by an earlier (interrupted) run
                    continue
                if ok[r]:
                    text = decode_answer(ctx.tokenizer, tokens[r], ctx.eos_ids)
                    records.append(make_record(it.question, text, run_model_id))
                else:
                    failed.append(key)
                    skipped[key] = rows.errors.get(key) or (f"question {key!r}: image could not be loaded (on "
                                                            "another process; see its log)")
            if main:
                answers.append(records)
            for key, msg in rows.errors.items():
                if not main:
                    print(msg, file=sys.stderr, flush=True)
            pbar.update(sum(int(status[it.index] == 0) for it in batch.items))
            if failed and opts.on_error == "stop":
                raise ItemError(f"{bench.name}/{spec.label}: {skipped[failed[0]]}"
                                + (f" (and {len(failed) - 1} more in this batch)" if len(failed) > 1 else ""))
            if opts.after_batch is not None:
                opts.after_batch(bi)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        pbar.close()

    # ---- efficiency (all processes take part: the programs are global)
    if reuse_timing and prev is not None:
        efficiency = prev["efficiency"]
        compile_recs = prev.get("compile", [])
    else:
        if opts.before_timing is not None:
            opts.before_timing()
        efficiency, compile_recs = _measure(ctx, engine, reducer, batches, items, my_rows, max_new, opts)
    wall = time.perf_counter() - t_start

    record: dict[str, Any] = {}
    if main:
        answers.finalize([q.key for q in questions])
        done = answers.load()
        texts = {k: r["text"] for k, r in done.items()}
        score, note = _score(bench, questions, texts)
        submission = _submission(bench, questions, texts, run_dir)
        outputs = _outputs(bench, questions, texts, run_dir)
        metric = HEADLINE.get(bench.name)
        record = {
            "benchmark": bench.name, "run": spec.label, "reducer": spec.name, "budget": spec.budget,
            "reducer_spec": repr(reducer), "model_id": ctx.model_id, "fingerprint": fingerprint,
            "n_questions": len(questions), "n_answered": sum(q.key in texts for q in questions),
            "n_skipped": len(skipped), "skipped": [{"key": k, "message": m} for k, m in skipped.items()],
            "headline_metric": metric,
            "headline": (score or {}).get(metric) if metric else None,
            "score": score, "score_note": note, "submission": submission,
            **({"outputs": outputs} if outputs else {}),
            "batch_size": B, "max_new_tokens": max_new, "devices": eff.device_description(ctx.mesh),
            "efficiency": efficiency, "compile": compile_recs, "wall_s": wall,
            "answers_file": str(answers.path),
        }
        write_json_atomic(run_dir / "run.json", record)
    return RunResult(bench.name, spec, run_dir, record)


def image_processor(cfg: Any, model_dir: str | Path | None, image_mode: str = "pad") -> Any:
    """The image preprocessing of the model's family, from its ``preprocessor_config.json`` when present:
    LLaVA-1.5 -> :class:`~jaxprune.processing.ImageProcessorConfig` (``image_mode`` pad | crop); LLaVA-NeXT ->
    :class:`~jaxprune.processing_anyres.AnyresProcessorConfig` (anyres; its pinpoints must be the model's)."""
    from jaxprune.processing import ImageProcessorConfig
    from jaxprune.processing_anyres import AnyresProcessorConfig

    pp = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
    d = None
    if pp is not None and pp.is_file():
        try:
            d = json.loads(pp.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{pp}: {e}") from None
    s = cfg.vision.image_size
    if video.is_video_model(cfg):  # Video-LLaVA: video benchmarks (frames at the model's image_size)
        return video.VideoEvalConfig.from_model(cfg, model_dir)
    if cfg.model_type == "llava_next":
        try:
            img_cfg = (AnyresProcessorConfig.from_hf_preprocessor_config(d, patch_size=cfg.vision.patch_size)
                       if d is not None else AnyresProcessorConfig.from_model_config(cfg))
        except ValueError as e:
            raise ConfigError(f"{pp}: {e}") from None
        if img_cfg.crop_size != s or tuple(map(tuple, img_cfg.pinpoints_hw)) != tuple(map(tuple, cfg.image_grid_pinpoints)):
            raise ConfigError(f"{pp}: the processor's crop size / image_grid_pinpoints ({img_cfg.crop_size}, "
                              f"{img_cfg.pinpoints_hw}) differ from the model config's ({s}, {cfg.image_grid_pinpoints})")
        return img_cfg
    if cfg.model_type == "llava_onevision":  # the model config's geometry (LlavaOnevisionImageProcessor defaults)
        from jaxprune.processing_onevision import OnevisionProcessorConfig

        return OnevisionProcessorConfig.from_model_config(cfg)
    if cfg.model_type != "llava":
        raise ConfigError(f"the eval harness has no image preprocessing for model_type={cfg.model_type!r}")
    img_cfg = None
    if d is not None:
        try:
            img_cfg = ImageProcessorConfig.from_hf_preprocessor_config(d, mode=image_mode)
        except ValueError as e:
            raise ConfigError(f"{pp}: {e}") from None
    if img_cfg is None or img_cfg.image_size != s:
        img_cfg = ImageProcessorConfig(image_size=s, shortest_edge=s, mode=image_mode)
    return img_cfg


def max_image_tokens(ctx: Any) -> int:
    """Placeholder tokens of the largest image the model takes (LLaVA-1.5: every image's count)."""
    return getattr(ctx.img_cfg, "max_tokens", ctx.model.cfg.tokens_per_image)


def _prepare(engine: Engine, rows: Any, B: int, where: str) -> Any:
    """``engine.prepare`` with the model's input / budget errors turned into :class:`ItemError`."""
    from jaxprune.inputs import InputError
    from jaxprune.reducers.base import BudgetError

    try:
        return engine.prepare(rows, B)
    except (BudgetError, InputError) as e:
        raise ItemError(f"{where}: {type(e).__name__}: {e}") from None


def _measure(ctx: Context, engine: Engine, reducer: Any, batches: list[Batch], items, my_rows: range,
             max_new: int, opts: RunOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = ctx.model.cfg
    P = max_image_tokens(ctx)
    img_batches = [b for b in batches if b.n_images] or batches
    out: dict[str, Any] = {}
    itemsize = int(np.dtype(ctx.model.dtype).itemsize)
    out.update(eff.analytic(cfg, reducer, [it.length - it.image_tokens for it in items if it.n_images],
                            max_new, itemsize,
                            images=[(it.image_tokens, it.image_crops) for it in items if it.n_images]))
    if img_batches:
        batch = img_batches[len(img_batches) // 2]
        rows = build_rows(batch, my_rows, ctx.tokenizer, cfg.image_token_index, P, ctx.img_cfg,
                          cfg.vision.image_size)
        prep = _prepare(engine, rows, batch.size, "timing batch")
        out.update(engine.time_batch(prep, opts.timing_reps))
        out["xla_flops_per_row"] = eff.xla_per_row(engine.compiled(prep), ctx.mesh.size)
        out["xla_prefill_temp_bytes"] = engine.compiled(prep).xla_temp_bytes
    peak, kind = eff.peak_memory()
    out["peak_memory_bytes"], out["peak_memory_kind"] = peak, kind
    compile_recs = eff.compile_records(engine.compiled_shapes)
    out["compile_s_total"] = sum(r["seconds"] for r in compile_recs)
    return out, compile_recs


def _score(bench: Any, questions: Sequence[Question], texts: dict[str, str]) -> tuple[dict | None, str | None]:
    """The benchmark's official-equivalent score (unanswered questions count as empty answers), or a note."""
    try:
        return bench.score(questions, texts), None
    except (NotImplementedError, ValueError, KeyError) as e:
        return None, f"{type(e).__name__}: {e}"


def _submission(bench: Any, questions: Sequence[Question], texts: dict[str, str], run_dir: Path) -> str | None:
    name = SUBMISSION.get(bench.name)
    if name is None or not getattr(bench, "has_submission", False):
        return None
    try:
        kw = {"fmt": "tsv"} if bench.name == "mmbench" else {}
        return str(bench.write_submission(questions, texts, run_dir / name, **kw))
    except Exception as e:  # noqa: BLE001 - a submission writer refusing (e.g. SEED with skipped questions)
        return f"not written: {type(e).__name__}: {e}"


def _outputs(bench: Any, questions: Sequence[Question], texts: dict[str, str], run_dir: Path) -> dict[str, str]:
    """Files a benchmark writes beside the answers for its official scoring elsewhere (video QA: Video-LLaVA's
    ``merge.jsonl`` and the GPT judge's requests): ``bench.write_predictions``, where it has one."""
    write = getattr(bench, "write_predictions", None)
    if write is None:
        return {}
    try:
        return write(questions, texts, run_dir)
    except Exception as e:  # noqa: BLE001 - a writer refusing must not lose the run's score
        return {"error": f"not written: {type(e).__name__}: {e}"}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _StatusLine:
    """Where stderr is not a terminal (a log file, a pipe): one line when the run's questions are answered, instead
    of a bar redrawn per batch."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.t0, self.closed = total, desc, 0, time.perf_counter(), False

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        if self.closed or not self.total:
            return
        self.closed = True
        print(f"{self.desc}: {self.n}/{self.total} questions answered in {time.perf_counter() - self.t0:.1f} s",
              file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal, else one status line per run; nothing when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    if not stderr_is_terminal():
        return _StatusLine(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True, leave=True)
