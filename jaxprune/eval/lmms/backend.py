"""The engine side of the lmms-eval model: batched, jitted greedy generation and continuation log-likelihoods.

No lmms-eval import: :class:`Backend` takes :class:`~jaxprune.eval.lmms.requests.GenRequest` /
:class:`~jaxprune.eval.lmms.requests.LoglikRequest` lists, so it is tested without lmms-eval installed.

Same path as ``jaxprune-eval``: the model, tokenizer, image preprocessing and data mesh come from
:func:`jaxprune.eval.load_model` + :meth:`jaxprune.eval.Context.create`; rows are tokenized with the harness'
HF-style ``<image>`` expansion and left-padded; batches have exactly ``batch_size`` rows (a multiple of the local
devices; short batches are filled with copies of their first row, whose outputs are dropped) and run through
:class:`jaxprune.eval.engine.Engine` (``model.plan`` buckets the length, so one (rows, bucket) shape compiles
once). Requests are grouped by image count (0 or 1: a static shape) and, for generation, by ``max_new_tokens``
(static in the decode loop), then sorted by prompt length.

Log-likelihood: one forward of prompt + continuation (``model.programs.forward``, the same batch-sharded global
arrays), then :func:`continuation_scores` on the device: the sum over the continuation's tokens of
``log_softmax(logits)[token]`` at the position before each, and whether every token is the argmax (``is_greedy``).
With a reducer the logits are those of the reduced sequence; the text tail (prompt end + continuation) is its last
valid columns on left-padded rows, which is where the continuation is read.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.eval import distributed as dist
from jaxprune.eval.batching import Rows
from jaxprune.eval.config import ConfigError, ItemError
from jaxprune.eval.engine import Engine
from jaxprune.eval.runner import Context, make_reducer, max_image_tokens
from jaxprune.processing import preprocess_image, tokenize_prompts
from jaxprune.processing_anyres import AnyresProcessorConfig, preprocess_anyres_image
from jaxprune.processing_onevision import OnevisionProcessorConfig

from .options import LmmsOptions
from .requests import GenRequest, LoglikRequest, chat_prompt, continuation_text, cut_at_stop, split_continuation


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One row on the host: token ids (image placeholders expanded) and its image's pixels."""

    index: int                       # position in the caller's request list
    ids: tuple[int, ...]
    pixels: np.ndarray | None        # [3, S, S] (anyres: [crops, 3, S, S]); None for a text-only row
    hw: tuple[int, int] | None       # the image's (height, width) (anyres rows)
    where: str


@functools.partial(jax.jit, static_argnames=("k",))
def continuation_scores(logits: jax.Array, valid: jax.Array, targets: jax.Array, tmask: jax.Array, k: int
                        ) -> tuple[jax.Array, jax.Array]:
    """``(sum of log-probs [B], is_greedy [B])`` of each row's continuation.

    logits ``[B, T, V]`` and valid ``[B, T]`` of left-padded rows (every row's last real token sits in the last
    valid column); targets ``[B, k]`` the continuation ids right-aligned (``tmask [B, k]`` marks the real ones).
    The logits at columns ``last-k .. last-1`` predict columns ``last-k+1 .. last``."""
    col = jnp.arange(logits.shape[1])
    last = jnp.max(jnp.where(valid.any(0), col, -1))
    sl = jax.lax.dynamic_slice_in_dim(logits, last - k, k, axis=1).astype(jnp.float32)  # [B, k, V]
    lp = jax.nn.log_softmax(sl, axis=-1)
    tok = jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, k]
    greedy = (jnp.argmax(sl, axis=-1) == targets) | ~tmask
    return jnp.sum(jnp.where(tmask, tok, 0.0), axis=-1), jnp.all(greedy, axis=-1)


class Backend:
    """A loaded model on its local data mesh, answering lmms-eval's request kinds (see module docstring)."""

    def __init__(self, opts: LmmsOptions, log: Callable[[str], None] | None = None):
        from jaxprune.engine import validate_reducer
        from jaxprune.eval.sweep import load_model

        if jax.process_count() > 1:
            raise ConfigError("the lmms-eval model runs one JAX process per lmms-eval rank: launch lmms-eval with "
                              "accelerate / torchrun (one rank per host) and do not call jax.distributed.initialize")
        self.opts = opts
        self.log = log or (lambda m: print(f"jaxprune lmms-eval: {m}", file=sys.stderr, flush=True))
        model, tok, model_id, model_dir = load_model(opts.pretrained, opts.dtype, opts.tokenizer, opts.bucket)
        self.ctx = Context.create(model, tok, model_id, num_devices=opts.num_devices, image_mode=opts.image_mode,
                                  model_dir=model_dir)
        cfg = model.cfg
        self.reducer = make_reducer(opts.reducer, cfg)
        if self.reducer is not None:
            try:
                validate_reducer(cfg, self.reducer)
            except ValueError as e:
                raise ConfigError(f"model_args reducer={opts.reducer.label}: {e}") from None
        n_dev = self.ctx.mesh.size
        self.batch_size = -(-opts.batch_size // n_dev) * n_dev
        self.my_rows = dist.local_rows(self.ctx.mesh, self.batch_size)
        self._engines: dict[int, Engine] = {}
        self._warned: set[str] = set()

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.ctx.model.cfg.model_type

    @property
    def tokenizer(self) -> Any:
        return self.ctx.tokenizer

    def warn_once(self, msg: str) -> None:
        """Log ``msg`` the first time it is seen."""
        if msg not in self._warned:
            self._warned.add(msg)
            self.log(msg)

    def engine(self, max_new_tokens: int) -> Engine:
        """The harness engine for this reducer and ``max_new_tokens`` (compiled programs shared across them)."""
        e = self._engines.get(max_new_tokens)
        if e is None:
            c = self.ctx
            e = Engine(c.model, self.reducer, c.mesh, c.params, max_new_tokens, c.eos_ids, c.pad_id, c.cache)
            self._engines[max_new_tokens] = e
        return e

    # ---- host encoding ---------------------------------------------------------------------------------------
    def encode(self, index: int, text: str, image: Any, where: str) -> Encoded:
        """Tokenize ``text`` (``<image>`` expanded to the image's placeholder count) and preprocess ``image``."""
        c = self.ctx
        px = hw = None
        k = 1
        if image is not None:
            try:
                if isinstance(c.img_cfg, (AnyresProcessorConfig, OnevisionProcessorConfig)):
                    px, hw = (c.img_cfg.preprocess(image) if isinstance(c.img_cfg, OnevisionProcessorConfig)
                              else preprocess_anyres_image(image, c.img_cfg))
                    k = c.img_cfg.num_image_tokens(*hw)
                else:
                    px = preprocess_image(image, c.img_cfg)
                    k = max_image_tokens(c)
            except Exception as e:  # noqa: BLE001 - PIL raises many types
                raise ItemError(f"{where}: cannot preprocess the image: {type(e).__name__}: {e}") from None
        return Encoded(index, self.tokenize(text, k, where), px, hw, where)

    def tokenize(self, text: str, image_tokens: int, where: str) -> tuple[int, ...]:
        """Token ids of ``text`` with each ``<image>`` expanded to ``image_tokens`` placeholder ids."""
        c = self.ctx
        try:
            ids = tokenize_prompts(c.tokenizer, [text], c.model.cfg.image_token_index, image_tokens)["input_ids"][0]
        except ValueError as e:
            raise ConfigError(f"{where}: {e}: the tokenizer must treat '<image>' as one special token") from None
        return tuple(int(t) for t in ids)

    def rows(self, chunk: Sequence[Encoded]) -> Rows:
        """This process' rows of one batch: ``chunk`` then copies of its first row up to the batch size."""
        B = self.batch_size
        full = list(chunk) + [chunk[0]] * (B - len(chunk))
        mine = [full[r] for r in self.my_rows]
        T = max(len(e.ids) for e in full)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(mine), T), pad, np.int32)
        mask = np.zeros((len(mine), T), np.int32)
        for j, e in enumerate(mine):
            ids[j, T - len(e.ids):] = e.ids
            mask[j, T - len(e.ids):] = 1
        ok = np.asarray([r < len(chunk) for r in self.my_rows], bool)
        px = sizes = None
        if chunk[0].pixels is not None:
            if isinstance(self.ctx.img_cfg, (AnyresProcessorConfig, OnevisionProcessorConfig)):
                S = self.ctx.model.cfg.vision.image_size
                px = np.zeros((len(mine), self.ctx.img_cfg.max_crops, 3, S, S), np.float32)
                sizes = np.zeros((len(mine), 2), np.int64)
                for j, e in enumerate(mine):
                    px[j, : e.pixels.shape[0]] = e.pixels
                    sizes[j] = e.hw
            else:
                px = np.stack([e.pixels for e in mine]).astype(np.float32)
        return Rows(ids, mask, px, ok, {}, sizes)

    def batches(self, encoded: Sequence[Encoded], key: Callable[[Encoded], Any] = lambda e: 0
                ) -> list[list[Encoded]]:
        """Groups (image or not, then ``key``), each sorted by (length, request order), cut into batches."""
        groups: dict[Any, list[Encoded]] = {}
        for e in encoded:
            groups.setdefault((e.pixels is None, key(e)), []).append(e)
        out = []
        for g in sorted(groups, key=repr):
            items = sorted(groups[g], key=lambda e: (len(e.ids), e.index))
            out += [items[s:s + self.batch_size] for s in range(0, len(items), self.batch_size)]
        return out

    def _prepare(self, engine: Engine, rows: Rows, where: str) -> Any:
        from jaxprune.inputs import InputError
        from jaxprune.reducers.base import BudgetError

        try:
            return engine.prepare(rows, self.batch_size)
        except (BudgetError, InputError) as e:
            raise ItemError(f"{where}: {type(e).__name__}: {e}") from None

    # ---- requests ----------------------------------------------------------------------------------------------
    def decode_text(self, ids: np.ndarray, until: Sequence[str]) -> str:
        """Generated ids -> text: up to the first EOS, ``skip_special_tokens``, cut at the first stop string."""
        ids = [int(t) for t in ids]
        for i, t in enumerate(ids):
            if t in self.ctx.eos_ids:
                ids = ids[:i]
                break
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), until)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy continuations, in request order."""
        enc = []
        for i, r in enumerate(requests):
            prompt = chat_prompt(r.context, len(r.images), r.where, self.model_type)
            enc.append(self.encode(i, prompt, r.images[0] if r.images else None, r.where))
        out: list[str | None] = [None] * len(requests)
        for chunk in self.batches(enc, key=lambda e: requests[e.index].settings.max_new_tokens):
            n = requests[chunk[0].index].settings.max_new_tokens
            engine = self.engine(n)
            tokens = engine.generate(self._prepare(engine, self.rows(chunk), chunk[0].where))  # [B, n]
            for r, e in enumerate(chunk):
                out[e.index] = self.decode_text(tokens[r], requests[e.index].settings.until)
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[LoglikRequest]) -> list[tuple[float, bool]]:
        """``(sum of log P(token), is_greedy)`` of each continuation given its context, in request order."""
        enc, starts = [], []
        for i, r in enumerate(requests):
            image = r.images[0] if r.images else None
            prompt = chat_prompt(r.context, len(r.images), r.where, self.model_type)
            full = self.encode(i, continuation_text(prompt, r.continuation), image, r.where)
            k = max(1, full.ids.count(self.ctx.model.cfg.image_token_index))  # the image's placeholder count
            ctx_ids = self.tokenize(prompt, k, r.where)
            enc.append(full)
            starts.append(split_continuation(ctx_ids, full.ids, r.where))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        engine = self.engine(1)
        m = self.ctx.model
        for chunk in self.batches(enc):
            rows = self.rows(chunk)
            prep = self._prepare(engine, rows, chunk[0].where)
            k = max(len(e.ids) - starts[e.index] for e in chunk)  # static: a small program per distinct k
            tg = np.zeros((len(self.my_rows), k), np.int32)
            tm = np.zeros((len(self.my_rows), k), bool)
            full = list(chunk) + [chunk[0]] * (self.batch_size - len(chunk))
            for j, r in enumerate(self.my_rows):
                e = full[r]
                cont = e.ids[starts[e.index]:]
                tg[j, k - len(cont):], tm[j, k - len(cont):] = cont, True
            logits, valid, _, _ = m.programs.forward(self.ctx.params, *prep.args, static=prep.static)
            to = lambda x: dist.to_global(x, self.ctx.mesh, self.batch_size)
            lp, greedy = continuation_scores(logits, valid, to(tg), to(tm), k)
            lp, greedy = dist.gather(lp), dist.gather(greedy)
            for r, e in enumerate(chunk):
                out[e.index] = (float(lp[r]), bool(greedy[r]))
        return out  # type: ignore[return-value]
