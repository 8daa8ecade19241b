"""The lmms-eval model class (``lmms_eval.api.model.lmms``): unpacks lmms-eval's requests for the :class:`Backend`.

Imports lmms-eval at module level (its base class); lmms-eval loads this module only through the entry point of
:mod:`jaxprune.eval.lmms`. Request shapes (lmms-eval 0.7, ``ConfigurableTask.construct_requests``):

* ``generate_until``: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``;
* ``generate_until_multi_round``: refused with an error naming the task (not implemented).

The doc is ``self.task_dict[task][split][doc_id]`` (lmms-eval fills ``task_dict`` before it calls the model).
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

try:  # lmms-eval >= 0.7: the evaluator unwraps every model output through `unwrap_generation_output`
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # older releases keep outputs as returned
    GenerationResult = object

from jaxprune.eval.config import ConfigError

from .backend import Backend
from .options import parse_model_args
from .requests import GenRequest, LoglikRequest, check_visuals, gen_settings, where


class LoglikResult(GenerationResult):
    """One ``loglikelihood`` answer, ``(score, is_greedy)``, that survives lmms-eval 0.7.3's evaluator.

    That evaluator passes every model output through ``api.instance.unwrap_generation_output``, which keeps a
    ``str`` or a ``GenerationResult``'s ``.text`` and turns anything else into ``str(output)``: a plain
    ``(float, bool)`` tuple reaches ``process_results`` as the string ``"(-1.2, False)"`` and ``multiple_choice``
    tasks crash in ``lls, is_greedy = zip(*results)`` (so do lmms-eval's own models' tuples). As a
    ``GenerationResult`` whose ``text`` is the tuple, the tuple itself reaches the task; it still unpacks, indexes
    and compares like the tuple (``score, greedy = result``)."""

    def __init__(self, pair: tuple[float, bool]) -> None:
        self.text = (float(pair[0]), bool(pair[1]))
        self.token_counts = None

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, i):
        return self.text[i]

    def __len__(self) -> int:
        return 2

    def __eq__(self, other) -> bool:
        return tuple(self.text) == tuple(other)

    def __repr__(self) -> str:
        return f"LoglikResult{self.text}"


class JaxpruneLMM(lmms):
    """``lmms-eval --model jaxprune --model_args pretrained=DIR,reducer=fastv:64,dtype=bfloat16,batch_size=16``."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.backend = Backend(parse_model_args(model_args))
        self.model_type = self.backend.model_type

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> JaxpruneLMM:
        """``--model_args`` win over lmms-eval's own ``--batch_size`` (which it always passes, default 1)."""
        from lmms_eval import utils

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(utils.simple_parse_args_string(arg_string or ""))
        return cls(**args)

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"{where(task, doc_id)}: lmms-eval gave no such doc (split {split!r}): {e}") from None

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> tuple:
        if doc_to_visual is None:
            return ()
        return check_visuals(doc_to_visual(self._doc(task, split, doc_id)), self.model_type, where(task, doc_id))

    # ---- lmms-eval's request kinds -------------------------------------------------------------------------------
    def generate_until(self, requests: list) -> list[str]:
        """Greedy generation, batched and jitted (see :class:`Backend`)."""
        reqs = []
        eos = None
        tok = self.backend.tokenizer
        if tok.eos_token is not None:
            eos = tok.eos_token
        for inst in requests:
            args = inst.args
            if len(args) != 6 or callable(args[1]):
                raise ConfigError(f"{where(getattr(inst, 'task_name', '?'), getattr(inst, 'doc_id', '?'))}: "
                                  "a chat-style (doc_to_messages) request; the jaxprune model is a simple model")
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            w = where(task, doc_id)
            settings, warnings = gen_settings(gen_kwargs, self.backend.opts.max_new_tokens, eos, w)
            for msg in warnings:
                self.backend.warn_once(f"task {task}: {msg}")
            reqs.append(GenRequest(str(context), self._visuals(doc_to_visual, task, split, doc_id), settings, w))
        return self.backend.generate(reqs)

    def loglikelihood(self, requests: list) -> list[LoglikResult]:
        """``(score, is_greedy)`` per request, in lmms-eval 0.7's two conventions (``api/task.py``):

        * ``output_type: loglikelihood`` (continuation = the task's ``doc_to_target``, a callable): the sum of the
          continuation's token log-probabilities (``perplexity`` aggregates ``exp(-mean)``);
        * ``output_type: multiple_choice`` (continuation = a string, one request per choice, plus the unconditional
          2-tuples of ``acc_mutual_info``): the *negative* sum, since that task type picks ``argmin`` of the
          returned values (lmms-eval's own models return a loss there).
        """
        reqs, negate = [], []
        for inst in requests:
            if len(inst.args) == 2:  # multiple choice's unconditional (acc_mutual_info) request: no doc, no visual
                reqs.append(LoglikRequest(str(inst.args[0]), str(inst.args[1]), (),
                                          where(getattr(inst, "task_name", "?"), getattr(inst, "doc_id", "?"))))
                negate.append(True)
                continue
            context, target, doc_to_visual, doc_id, task, split = inst.args
            w = where(task, doc_id)
            cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(cont, (list, tuple)):
                raise ConfigError(f"{w}: doc_to_target gave {len(cont)} targets; loglikelihood scores one")
            reqs.append(LoglikRequest(str(context), str(cont), self._visuals(doc_to_visual, task, split, doc_id), w))
            negate.append(isinstance(target, str))
        return [LoglikResult((-lp if neg else lp, g))
                for (lp, g), neg in zip(self.backend.loglikelihood(reqs), negate)]

    def generate_until_multi_round(self, requests: list) -> list[str]:
        """Not implemented: refused with the task's name."""
        inst = requests[0] if requests else None
        task = getattr(inst, "task_name", None) or "?"
        raise ConfigError(f"task {task}: generate_until_multi_round is not implemented by the jaxprune lmms-eval "
                          "model (single-turn tasks only)")
