"""``jaxprune-eval``: the evaluation entry point.

With no arguments it runs the built-in default (:mod:`experiments.demo`): a small local model
through conversion, preprocessing, the full model and the reducers, with no downloads.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxprune-eval", description=__doc__)
    ap.add_argument("--demo", action="store_true", help="run the built-in default (also what no arguments do)")
    ap.parse_args(sys.argv[1:] if argv is None else argv)
    from experiments import demo

    demo.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
