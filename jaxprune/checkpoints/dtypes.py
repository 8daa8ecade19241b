"""Parameter dtypes: the names a user may give (``"bf16"``, ``"float32"``, a NumPy or JAX dtype) and which count
as floating point (the ``ml_dtypes`` types included)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                "f32": "float32", "f16": "float16"}


def is_float_dtype(dtype: Any) -> bool:
    """Floating point, including the ``ml_dtypes`` types (``bfloat16``, ``float8_*``) NumPy does not classify."""
    dt = np.dtype(dtype)
    return bool(np.issubdtype(dt, np.floating)) or dt.type in (
        ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


def parse_dtype(dtype: Any) -> np.dtype | None:
    """``None`` -> ``None``; a name (``"bfloat16"``, ``"bf16"``, ``"float32"``), NumPy or JAX dtype -> ``np.dtype``.

    Raises ``ValueError`` for an unknown or non-floating-point dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower(), dtype.lower())
        if name == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        dtype = name
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if not is_float_dtype(dt):
        raise ValueError(f"dtype {dt} is not a floating-point type")
    return dt
