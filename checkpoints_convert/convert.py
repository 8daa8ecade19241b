"""The conversion command: ``python -m checkpoints_convert SRC DST [--dtype bfloat16] [--force] [--clip-dir DIR]
[--export-hf --layout legacy|v5 --max-shard-size 5GB]``.

Without ``--export-hf``: convert SRC (a local HF / original-LLaVA directory, or a hub id) into a
jaxprune directory DST (orbax params + config.json + jaxprune.json + tokenizer files).
With ``--export-hf``: read SRC (converted, HF or original) and write an HF safetensors checkpoint
to DST in the ``legacy`` (llava-hf) or ``v5`` (transformers 5) key layout.

User errors (bad paths, corrupt files, mismatched checkpoints, unsupported config fields, an
existing DST without ``--force``) print one message and exit with status 2, without a traceback.
The work is done by :mod:`jaxprune.checkpoints`; this module only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?", re.IGNORECASE)


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB, 1048576)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description="Convert a LLaVA checkpoint (HF llava / llava_next in any key layout, or original LLaVA) "
                    "to jaxprune (orbax), or export jaxprune/HF params back to HF safetensors.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory, converted directory, or hub id (owner/name)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", default=None, help="cast every tensor (bfloat16, float16, float32); default: keep")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--clip-dir", default=None, help="CLIP directory (or hub id) for original LLaVA checkpoints")
    p.add_argument("--export-hf", action="store_true", help="write HF safetensors instead of a jaxprune directory")
    p.add_argument("--layout", choices=("legacy", "v5"), default=None,
                   help="HF key layout for --export-hf (default: legacy)")
    p.add_argument("--max-shard-size", type=_size, default=None, help="shard size for --export-hf (default 5GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.export_hf and (args.layout is not None or args.max_shard_size is not None):
        print("error: --layout and --max-shard-size only apply with --export-hf", file=sys.stderr)
        return 2

    from jaxprune.checkpoints import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, convert, export_hf, load_params,
                                      parse_dtype, resolve_source)
    from jaxprune.config import ConfigError

    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        print(f"error: --dtype: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.export_hf:
            src = resolve_source(args.src)
            cfg, params = load_params(src, dtype=args.dtype, clip_dir=args.clip_dir)
            export_hf(cfg, params, args.dst, layout=args.layout or "legacy",
                      max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES, force=args.force,
                      support_dir=src)
            what = f"HF checkpoint ({args.layout or 'legacy'} layout)"
        else:
            convert(args.src, args.dst, dtype=args.dtype, force=args.force, clip_dir=args.clip_dir)
            what = "jaxprune checkpoint"
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {what} to {args.dst} in {time.perf_counter() - t0:.1f}s")
    return 0
