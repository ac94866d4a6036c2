"""What the command-line scripts share: common flags, help that shows every default and an example, logging,
and the error edge. Torch-free, like every module a script imports before parsing: --help loads no torch."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, Sequence

from gaprune.coefficients import DAIConfig
from gaprune.errors import InputError, first_line
from gaprune.options import (ACCUMULATE_ON, FISHER_NORMS, GRADIENTS, GROUP_ORDERS, LAYER_TYPES, NATURAL_ORDER,
                             OWN_TARGET, POSTPROCESSING, RECONSTRUCTION_TARGETS, SPARSITY_PATTERNS, TOKEN_WEIGHTINGS,
                             UNIFORM_SHARES, UNIFORM_WEIGHTING)

log = logging.getLogger("gaprune")


def shows_default(action: argparse.Action) -> bool:
    """A default worth printing: not None, not a switch's False, not suppressed (0 and 0.0 are)."""
    return action.default is not None and action.default is not False and action.default != argparse.SUPPRESS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help (unless the help names it already); the description (a script's docstring,
    with its example) keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not shows_default(action) or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose --help shows every default and the description as written (a script's docstring, with
    its example), and that reports a bad flag as one line (plus a pointer to --help) with exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def format_help(self) -> str:
        for action in self._actions:  # a flag without help text still shows its default
            if action.help is None and shows_default(action):
                action.help = "(default: %(default)s)"
        return super().format_help()

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


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {number}")
    return number


def finite_float(value: str) -> float:
    """A float flag: NaN and infinities are refused (a NaN coefficient would silently mask nothing)."""
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


SCORING_DTYPE_HELP = ("auto = bfloat16 on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX), float32 on "
                      "other CPUs; sums stay float32 (default: auto)")


def add_runtime_args(parser: argparse.ArgumentParser,
                     dtype_help: str = "auto = bfloat16 on CUDA, float32 on CPU (default: auto)") -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when present (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help=dtype_help)


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """Where the scoring stages keep their float32 sums (the memory plan decides for auto)."""
    parser.add_argument("--accumulate_on", default="auto", choices=ACCUMULATE_ON,
                        help="where the float32 sums live: device (beside the model), sharded (under torchrun: each "
                             "tensor's sums on one rank, every step's gradients reduced onto it), cpu (host memory, "
                             "pinned copies), auto (device unless the memory plan says it would be over 90%% full, "
                             "then sharded if that fits, else cpu)")
    parser.add_argument("--gradients", default="all", choices=GRADIENTS,
                        help="all: every parameter takes a gradient and gets a summary entry (published); selected: "
                             "only the --sparsify_layers parameters, saving their backward time and memory (the "
                             "embedding matrix of Qwen3-Embedding-4B alone is 388M weights) (default: all)")


def add_layer_args(parser: argparse.ArgumentParser, default: Sequence[str]) -> None:
    parser.add_argument("--sparsify_layers", nargs="+", default=list(default), choices=sorted(LAYER_TYPES),
                        metavar="TYPE",
                        help=f"layer types: {', '.join(sorted(LAYER_TYPES))} (default: {' '.join(default)})")


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    """The coefficients of the scorers (gaprune/scoring.py), shared by SparseModel.py and compare.py;
    their defaults are DAIConfig's."""
    defaults = DAIConfig()
    group = parser.add_argument_group("scoring coefficients")

    def coefficient(name: str, help: str, **kwargs) -> None:
        default = getattr(defaults, name)
        group.add_argument(f"--{name}", type=finite_float if isinstance(default, float) else type(default),
                           default=default, help=f"{help} (default: {default})", **kwargs)

    coefficient("beta", "dai, dai_paper: weight of the general Fisher term")
    coefficient("compression_weight", "dai, dai_paper: weight of the sqrt|W| term")
    coefficient("score_postproc", "dai: per-tensor normalisation of the scores", choices=POSTPROCESSING)
    coefficient("score_temperature", "dai: zscore_sigmoid temperature")
    coefficient("fusion_alpha", "dai: weight of an added Fd*|W| term")
    coefficient("fusion_beta", "dai: weight of the DAI score in the fusion")
    coefficient("alignment_weight", "dai_paper, aligned_saliency: alpha in (1 + alpha*s), s the gradient cosine "
                                    "from gradient.py --alignment_mode local_cosine/row_cosine")
    coefficient("domain_weight", "aligned_saliency: lambda_d")
    coefficient("general_weight", "aligned_saliency: lambda_g")
    coefficient("fisher_norm", "dai_paper, aligned_saliency: Fisher divided by its mean over all candidates "
                               "(global) or per tensor, or raw (none)", choices=FISHER_NORMS)


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """N:M patterns, and the calibration texts of Wanda, SparseGPT and reconstruction (SparseModel.py, compare.py)."""
    group = parser.add_argument_group("patterns and calibration (Wanda, SparseGPT, reconstruction)")
    group.add_argument("--sparsity_pattern", default="unstructured", choices=SPARSITY_PATTERNS,
                       help="unstructured (default), or N of every M consecutive input weights of each row "
                            "(2:4 is the pattern GPUs accelerate); the share is then N/M")
    group.add_argument("--reconstruct", action="store_true",
                       help="after masking, update the kept weights to restore each layer's outputs on the "
                            "calibration texts (the SparseGPT/OBS update under the chosen mask)")
    group.add_argument("--layer_shares", default=UNIFORM_SHARES, metavar="uniform|SCORER",
                       help="wanda, sparsegpt: the same share of every layer (uniform, default), or each layer's "
                            "share of the global budget as a score-based scorer (aligned_saliency, magnitude, ...) "
                            "ranks all candidates; the pruner then picks the weights inside each layer")
    group.add_argument("--group_order", default=NATURAL_ORDER, choices=GROUP_ORDERS,
                       help="sparsegpt with an N:M pattern: prune the groups of M columns left to right (natural, "
                            "default) or by decreasing input energy, the diagonal of X^T X (hessian)")
    group.add_argument("--reconstruction_target", default=OWN_TARGET, choices=RECONSTRUCTION_TARGETS,
                       help="sparsegpt, --reconstruct: the updated weights reproduce each layer's own outputs on "
                            "the inputs the pruned layers before it give it (own, default), or the dense "
                            "model's outputs, repairing what those layers changed (dense: the dense model runs "
                            "beside the pruned one while calibrating)")
    group.add_argument("--calibration_data", help="domain triples whose texts calibrate wanda, sparsegpt and "
                                                  "--reconstruct")
    group.add_argument("--general_calibration_data", help="general triples, blended in (cross-calibration)")
    group.add_argument("--calibration_samples", type=positive_int, default=128,
                       help="triples per calibration file; each gives 3 texts (default: 128)")
    group.add_argument("--calibration_mix", type=finite_float,
                       help="share of the general side in the blended statistics (default: 0.5 with both files, "
                            "else the one given)")
    group.add_argument("--calibration_max_length", type=positive_int, help="tokens per calibration text "
                                                                           "(default: the model's limit)")
    group.add_argument("--calibration_batch_size", type=positive_int, default=8)
    group.add_argument("--calibration_weighting", default=UNIFORM_WEIGHTING, choices=TOKEN_WEIGHTINGS,
                       help="every calibration token counts once in a layer's statistics (uniform, default), or "
                            "as much as the contrastive loss's squared gradient at the layer's output for it "
                            "(loss_gradient: one extra backward pass over the calibration triples)")


def finish(path: str) -> str:
    """Print the path of the main file a stage wrote, as its last line (the next stage takes it), and return it."""
    print(path)
    return path


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); user errors, and files or folders that cannot be written, become one line on
    stderr and exit code 1. Under torchrun every rank meets the same refusal and rank 0 alone prints it (the
    rank comes from the environment, so this holds before the process group exists): another rank first
    waits, and torchrun stops it when rank 0 exits; one that is still running then met a refusal of its
    own, and says it with its rank."""
    import time

    from safetensors import SafetensorError

    from gaprune.errors import OutputError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("gaprune").setLevel(logging.INFO)  # gaprune's progress; other libraries' warnings only

    def refuse(message: str, code: int = 1) -> None:
        from gaprune import distributed

        if not distributed.reports_errors():
            time.sleep(distributed.QUIET_RANK_WAIT_S)
            message = f"{message} (rank {distributed.env_rank()})"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)

    try:
        main(argv)
    except (InputError, OutputError) as err:  # OutputError: names the file or folder, the partial one removed
        refuse(str(err))
    except OSError as err:  # a path that cannot be read or written, a full disk: name the path, no traceback
        where = err.filename if err.filename is not None else ""
        refuse(f"{err.strerror or first_line(err)}{f': {where}' if where else ''}")
    except SafetensorError as err:  # safetensors' own class (not an OSError), from a write gaprune did not wrap
        refuse(f"safetensors: {first_line(err)}")
    except KeyboardInterrupt:
        refuse("interrupted", 130)
    finally:
        distributed = sys.modules.get("gaprune.distributed")  # none to leave when the stage never loaded it
        if distributed is not None:
            distributed.shutdown()
