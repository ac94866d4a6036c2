"""What the four command-line scripts share: common flags, logging, and the error edge."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from gaprune.errors import InputError
from gaprune.layers import LAYER_TYPES

log = logging.getLogger("gaprune")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (plus a pointer to --help) and exits with 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def str2bool(value: str) -> bool:
    """Parse True/False, 1/0, yes/no as written (argparse's type=bool treats "False" as True)."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, 1/0 or yes/no, got {value!r}")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when present (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = bfloat16 on CUDA, float32 on CPU (default: auto)")


def add_layer_args(parser: argparse.ArgumentParser, default: Sequence[str]) -> None:
    parser.add_argument("--sparsify_layers", nargs="+", default=list(default), choices=sorted(LAYER_TYPES),
                        metavar="TYPE",
                        help=f"layer types: {', '.join(sorted(LAYER_TYPES))} (default: {' '.join(default)})")


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); user errors become one line on stderr and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
