"""Convert LLaVA checkpoints (Hugging Face, three key generations, or original LLaVA) to jaxprune and back.

Command line: ``python -m checkpoints_convert SRC DST [--dtype bfloat16] [--force] [--clip-dir DIR]
[--export-hf --layout legacy|v5]``.

Library::

    from checkpoints_convert import convert, load_params, read_checkpoint, export_hf
    cfg, params = read_checkpoint("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")  # {canonical name: np.ndarray}
    convert("path/to/hf_dir", "path/to/out")                                      # orbax + config.json + jaxprune.json
    cfg, params = load_params("path/to/out")                                      # converted, HF or original dir
    export_hf(cfg, params, "path/to/hf_again", layout="v5")
"""

from checkpoints_convert.convert import (
    convert,
    is_converted,
    load_converted,
    load_params,
    plan_checkpoint,
    read_checkpoint,
)
from checkpoints_convert.errors import (
    CheckpointFileError,
    ConvertError,
    DestinationExistsError,
    ParamMismatchError,
)
from checkpoints_convert.export import check_params, export_hf, hf_state_dict, parse_dtype
from checkpoints_convert.safetensors_io import SafetensorsCheckpoint, read_header, write_safetensors, write_sharded
from checkpoints_convert.source import resolve_source

__all__ = [
    "CheckpointFileError", "ConvertError", "DestinationExistsError", "ParamMismatchError", "SafetensorsCheckpoint",
    "check_params", "convert", "export_hf", "hf_state_dict", "is_converted", "load_converted", "load_params",
    "parse_dtype", "plan_checkpoint", "read_checkpoint", "read_header", "resolve_source", "write_safetensors",
    "write_sharded",
]
