"""LLaVA checkpoints: read any HF key layout or original LLaVA, write and read converted (orbax) directories, export.

    from jaxprune.checkpoints import convert, export_hf, load_params, read_checkpoint
    cfg, params = read_checkpoint("llava-hf/llava-1.5-7b-hf", dtype="bfloat16")  # {canonical name: np.ndarray}
    convert("path/to/hf_dir", "path/to/out")                                      # orbax + config.json + jaxprune.json
    cfg, params = load_params("path/to/out")                                      # converted, HF or original dir
    export_hf(cfg, params, "path/to/hf_again", layout="v5")

Names and layouts are those of :func:`jaxprune.models.param_spec.param_shapes`. Modules, one idea each:
``safetensors_io`` / ``safetensors_write`` (the file format, streamed), ``torch_bin`` (``.bin`` fallback),
``keys`` (HF key layouts <-> canonical names), ``original`` (original-LLaVA config and keys), ``source``
(local directory or hub id; atomic destinations), ``plan`` (headers checked against the config before any
data is read), ``read`` (streaming into canonical arrays), ``orbax_io``, ``converted`` (converted
directories), ``export`` (canonical -> HF safetensors), ``errors``. The command line on top of this is
``python -m checkpoints_convert``.
"""

from jaxprune.checkpoints.converted import convert, is_converted, load_converted, load_params
from jaxprune.checkpoints.dtypes import parse_dtype
from jaxprune.checkpoints.errors import (
    CheckpointError,
    CheckpointFileError,
    ConvertError,
    DestinationExistsError,
    ParamMismatchError,
)
from jaxprune.checkpoints.export import DEFAULT_MAX_SHARD_BYTES, export_hf, hf_state_dict
from jaxprune.checkpoints.plan import CheckpointPlan, check_params, plan_checkpoint
from jaxprune.checkpoints.read import read_checkpoint
from jaxprune.checkpoints.safetensors_io import SafetensorsCheckpoint, load_file, read_header
from jaxprune.checkpoints.safetensors_write import write_safetensors, write_sharded
from jaxprune.checkpoints.source import resolve_source

__all__ = [
    "CheckpointError", "CheckpointFileError", "CheckpointPlan", "ConvertError", "DEFAULT_MAX_SHARD_BYTES",
    "DestinationExistsError", "ParamMismatchError", "SafetensorsCheckpoint", "check_params", "convert", "export_hf",
    "hf_state_dict", "is_converted", "load_converted", "load_file", "load_params", "parse_dtype", "plan_checkpoint",
    "read_checkpoint", "read_header", "resolve_source", "write_safetensors", "write_sharded",
]
