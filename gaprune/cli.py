"""What the four command-line scripts share: common flags, logging, and the error edge."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable, Sequence

from gaprune.dai import FISHER_NORMS, POSTPROCESSING, DAIConfig, required_score_files
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


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    """The coefficients of the scorers (see gaprune/dai.py), shared by SparseModel.py and compare.py."""
    group = parser.add_argument_group("scoring coefficients")
    group.add_argument("--beta", type=float, default=1.0,
                       help="dai, dai_paper: weight of the general Fisher term (default: 1.0)")
    group.add_argument("--compression_weight", type=float, default=0.5,
                       help="dai, dai_paper: weight of the sqrt|W| term (default: 0.5)")
    group.add_argument("--score_postproc", default="none", choices=POSTPROCESSING,
                       help="dai: per-tensor normalisation of the scores (default: none)")
    group.add_argument("--score_temperature", type=float, default=1.0, help="dai: zscore_sigmoid temperature")
    group.add_argument("--fusion_alpha", type=float, default=0.0, help="dai: weight of an added Fd*|W| term")
    group.add_argument("--fusion_beta", type=float, default=1.0, help="dai: weight of the DAI score in the fusion")
    group.add_argument("--alignment_weight", type=float, default=DAIConfig.alignment_weight,
                       help="dai_paper, aligned_saliency: alpha in (1 + alpha*s), s the gradient cosine from "
                            f"gradient.py --alignment_mode local_cosine/row_cosine (default: {DAIConfig.alignment_weight})")
    group.add_argument("--domain_weight", type=float, default=DAIConfig.domain_weight,
                       help=f"aligned_saliency: lambda_d (default: {DAIConfig.domain_weight})")
    group.add_argument("--general_weight", type=float, default=DAIConfig.general_weight,
                       help=f"aligned_saliency: lambda_g (default: {DAIConfig.general_weight})")
    group.add_argument("--fisher_norm", default=DAIConfig.fisher_norm, choices=FISHER_NORMS,
                       help="dai_paper, aligned_saliency: Fisher divided by its mean over all candidates "
                            f"(global) or per tensor, or raw (none) (default: {DAIConfig.fisher_norm})")


def scoring_config(args: argparse.Namespace) -> DAIConfig:
    return DAIConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DAIConfig)})


def check_scorer_inputs(scoring: str, config: DAIConfig, args: argparse.Namespace) -> None:
    """The score files a scorer cannot run without were given (``args.<side>_scores``)."""
    if scoring == "aligned_saliency" and config.domain_weight == 0 and config.general_weight == 0:
        raise InputError("aligned_saliency needs a nonzero --domain_weight or --general_weight")
    for side in required_score_files(scoring, config):
        if not getattr(args, f"{side}_scores"):
            raise InputError(f"scorer {scoring} needs --{side}_scores")


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
