"""``--model_args`` of the lmms-eval model: ``pretrained=DIR,reducer=fastv:64,dtype=bfloat16,batch_size=16``.

lmms-eval splits the string on commas and turns ``true`` / ``false`` / digits into Python values
(``lmms_eval.utils.simple_parse_args_string``); :func:`parse_model_args` takes that dict, checks every key and value,
and names the bad one. The reducer spec is parsed by :meth:`jaxprune.eval.config.ReducerSpec.parse`, the grammar of
``jaxprune-eval --reducer`` (``NAME:BUDGET`` or ``full``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune.eval.config import ConfigError, ReducerSpec

#: lmms-eval's own LLaVA models default to 1024 new tokens when a task sets no ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 1024
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_MODES = ("pad", "crop")


@dataclasses.dataclass(frozen=True)
class LmmsOptions:
    """What ``--model_args`` sets (frozen: one model instance, one configuration)."""

    pretrained: str                       # HF LLaVA dir, converted jaxprune dir, or a built-in name (``demo``)
    reducer: ReducerSpec = ReducerSpec("full")
    dtype: str = "float32"
    batch_size: int = 8                   # rows per compiled batch (rounded up to a multiple of the devices)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when the task's generation_kwargs set none
    tokenizer: str | None = None          # tokenizer dir when it is not saved with the model
    image_mode: str = "pad"               # LLaVA-1.5 preprocessing: pad to square (LLaVA's) or HF's crop
    num_devices: int | None = None        # local devices of the data mesh (None: all)
    bucket: int | None = None             # prompt-length bucket (None: the model's)


#: lmms-eval passes these to every model (``--batch_size`` / ``--device`` / ``--max_batch_size``); ``device`` and
#: ``max_batch_size`` mean nothing to JAX and are accepted and ignored.
_IGNORED = ("device", "max_batch_size")


def _int(key: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"model_args {key}={value!r}: expected an integer")
    try:
        v = int(str(value))
    except ValueError:
        raise ConfigError(f"model_args {key}={value!r}: expected an integer") from None
    if v < lo:
        raise ConfigError(f"model_args {key}={value!r}: must be >= {lo}")
    return v


def parse_model_args(args: dict[str, Any]) -> LmmsOptions:
    """``model_args`` (as lmms-eval parsed them) -> :class:`LmmsOptions`; :class:`ConfigError` names a bad key."""
    args = dict(args)
    for k in _IGNORED:
        args.pop(k, None)
    fields = {f.name for f in dataclasses.fields(LmmsOptions)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ConfigError(f"model_args: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if not args.get("pretrained"):
        raise ConfigError("model_args: pretrained=DIR is required (a LLaVA HF or converted jaxprune directory)")
    out: dict[str, Any] = {"pretrained": str(args["pretrained"])}
    if args.get("reducer") not in (None, ""):
        out["reducer"] = ReducerSpec.parse(str(args["reducer"]))
    if "dtype" in args:
        dt = str(args["dtype"])
        if dt not in DTYPES:
            raise ConfigError(f"model_args dtype={dt!r}: expected one of {', '.join(DTYPES)}")
        out["dtype"] = dt
    if "image_mode" in args:
        if str(args["image_mode"]) not in IMAGE_MODES:
            raise ConfigError(f"model_args image_mode={args['image_mode']!r}: expected one of {', '.join(IMAGE_MODES)}")
        out["image_mode"] = str(args["image_mode"])
    for k in ("batch_size", "max_new_tokens", "num_devices", "bucket"):
        if args.get(k) not in (None, ""):
            if k == "batch_size" and str(args[k]).startswith("auto"):
                raise ConfigError(f"model_args batch_size={args[k]!r}: give a number (rows per compiled batch)")
            out[k] = _int(k, args[k])
    if args.get("tokenizer"):
        out["tokenizer"] = str(args["tokenizer"])
    return LmmsOptions(**out)
