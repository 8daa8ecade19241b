"""``python -m checkpoints_convert ...`` (see :mod:`checkpoints_convert.convert`)."""

import sys

from checkpoints_convert.convert import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
