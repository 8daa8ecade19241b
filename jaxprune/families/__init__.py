"""Model families (one file each): how a family's pixel inputs become visual segments and where they sit.

``get(cfg.model_type)`` returns the family the engine runs; see :mod:`jaxprune.families.base` for the contract.
"""

from jaxprune.families import llava, llava_next, llava_onevision, video_llava  # noqa: F401  (each registers itself)
from jaxprune.families.base import Family, FamilyStatic, VisualInputs, get, names, register

__all__ = ["Family", "FamilyStatic", "VisualInputs", "get", "names", "register", "llava", "llava_next", "llava_onevision",
           "video_llava"]
