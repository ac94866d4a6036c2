"""The registry of scorers: what each one reads and how it builds its per-tensor score function.

An entry says which score files it cannot run without, whether it reads the cosine arrays of
gradient.py --alignment_mode local_cosine/row_cosine, which diagnostics it reports, and how it scores
a tensor. SparseModel.py, compare.py and the CLI checks ask this registry; nothing else knows a
scorer by name. Adding a scorer is one entry in SCORERS.

Activation-aware entries declare ``needs_activations``: the orchestration then calibrates block by
block (gaprune.calibration) and hands each layer's input statistics in ``ScoringContext.inputs``.
Wanda is a score (|W| times input norm) compared within each output row; SparseGPT chooses its mask
while it updates the weights, so it is a ``layer_pruner`` rather than a score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from gaprune.coefficients import DAIConfig
from gaprune.errors import InputError
from gaprune.results import FILE_KINDS

if TYPE_CHECKING:  # the registry itself loads without torch, so that the scripts' --help needs none
    import torch

    from gaprune.input_stats import LayerInputs
    from gaprune.masking import ScoreFn
    from gaprune.patterns import Pattern
    from gaprune.scoring import ArrayFn

SIDES = tuple(FILE_KINDS)  # the score files a scorer may read: domain_fisher, general_fisher, alignment


@dataclass
class ScoringContext:
    """What a scorer may use: the candidate weights, the given score files, the coefficients, a seed."""

    candidates: Mapping[str, torch.Tensor]
    arrays: ArrayFn  # (side, name) -> array, or None where no file was given; side "alignment_cosine" too
    config: DAIConfig
    seed: int = 42
    inputs: Mapping[str, LayerInputs] = field(default_factory=dict)  # calibration statistics, by parameter


def _no_files(config: DAIConfig) -> tuple[str, ...]:
    return ()


def _never(config: DAIConfig) -> bool:
    return False


@dataclass(frozen=True)
class Scorer:
    name: str
    summary: str  # one line for --help and the README
    build: Callable[[ScoringContext], ScoreFn] | None  # None for a layer_pruner
    required_files: Callable[[DAIConfig], tuple[str, ...]] = _no_files  # sides it cannot run without
    reads_cosine: Callable[[DAIConfig], bool] = _never  # needs cosine arrays in a given alignment file
    diagnostics: Callable[[ScoringContext], dict] = field(default=lambda context: {})
    needs_activations: bool = False  # calibration inputs of each candidate layer (activation-aware pruners)
    updates_weights: bool = False  # changes the kept weights, not only zeroes the pruned ones
    budget: str | None = None  # where the share is taken when not over all candidates: "row" (Wanda), "block"
    # (weight, its LayerInputs, share, pattern, N:M group order) -> (new weight, mask): prunes one layer itself
    layer_pruner: Callable[[torch.Tensor, LayerInputs, float, Pattern, str],
                           tuple[torch.Tensor, torch.Tensor]] | None = None

    def check(self, config: DAIConfig, given: set[str]) -> None:
        """The coefficients make sense for this scorer and every file it cannot run without is in ``given``."""
        files = self.required_files(config)
        if files is None:
            raise InputError(f"{self.name} needs a nonzero --domain_weight or --general_weight")
        for side in files:
            if side not in given:
                raise InputError(f"scorer {self.name} needs --{side}_scores")


def _side_or(arrays: ArrayFn, side: str, name: str, absent: float) -> torch.Tensor | float:
    value = arrays(side, name)
    return absent if value is None else value


def _build_dai(context: ScoringContext) -> ScoreFn:
    from gaprune import scoring

    arrays, config = context.arrays, context.config

    def score(name: str, weight: torch.Tensor) -> torch.Tensor:
        return scoring.dai_score(weight, _side_or(arrays, "domain_fisher", name, 1.0),
                                 _side_or(arrays, "general_fisher", name, 1.0),
                                 _side_or(arrays, "alignment", name, 0.0), config)
    return score


def _cosine_factor(context: ScoringContext, name: str, weight: torch.Tensor) -> torch.Tensor | None:
    from gaprune import scoring

    alpha = context.config.alignment_weight
    cosine = context.arrays("alignment_cosine", name) if alpha else None
    return scoring.alignment_factor(cosine, weight, alpha)


def _build_dai_paper(context: ScoringContext) -> ScoreFn:
    from gaprune import scoring

    fisher = scoring.normalized_fisher(context.arrays, context.candidates, context.config.fisher_norm)

    def score(name: str, weight: torch.Tensor) -> torch.Tensor:
        fd, fg = fisher("domain_fisher", name), fisher("general_fisher", name)
        return scoring.dai_paper_score(weight, 1.0 if fd is None else fd, 1.0 if fg is None else fg,
                                       _cosine_factor(context, name, weight), context.config)
    return score


def _build_aligned_saliency(context: ScoringContext) -> ScoreFn:
    from gaprune import scoring

    fisher = scoring.normalized_fisher(context.arrays, context.candidates, context.config.fisher_norm)
    config = context.config

    def score(name: str, weight: torch.Tensor) -> torch.Tensor:
        fd = fisher("domain_fisher", name) if config.domain_weight else None
        fg = fisher("general_fisher", name) if config.general_weight else None
        return scoring.aligned_saliency_score(weight, fd, fg, _cosine_factor(context, name, weight), config)
    return score


def _aligned_saliency_files(config: DAIConfig) -> tuple[str, ...] | None:
    files = tuple(side for side, weight in (("domain_fisher", config.domain_weight),
                                            ("general_fisher", config.general_weight)) if weight != 0)
    return files or None  # None: no side left, the coefficients make no scorer


def _reads_cosine_when_weighted(config: DAIConfig) -> bool:
    return config.alignment_weight != 0


def _fisher_saliency(side: str) -> Scorer:
    def build(context: ScoringContext) -> ScoreFn:
        from gaprune import scoring

        return lambda name, weight: scoring.fisher_saliency(weight, context.arrays(side, name))
    return Scorer(side, f"Fisher saliency F*w^2 of the {side.split('_')[0]} side (needs its file)", build,
                  required_files=lambda config: (side,))


def _build_random(context: ScoringContext) -> ScoreFn:
    from gaprune import scoring

    return lambda name, weight: scoring.random_score(name, weight, context.seed)


def _build_magnitude(context: ScoringContext) -> ScoreFn:
    from gaprune import scoring

    return lambda name, weight: scoring.magnitude(weight)


def _build_wanda(context: ScoringContext) -> ScoreFn:
    from gaprune import pruners

    return lambda name, weight: pruners.wanda_scores(weight, context.inputs[name].input_sq).reshape(-1)


def _sparsegpt_layer(weight: torch.Tensor, inputs: LayerInputs, share: float, pattern: Pattern,
                     group_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    from gaprune import pruners

    hessian = inputs.hessian
    return pruners.sparsegpt(inputs.start_weight(weight, hessian), hessian, share, pattern, group_order=group_order)


def _dai_diagnostics(context: ScoringContext) -> dict:
    from gaprune import scoring

    return {"median_fisher_to_compression_ratio":
            scoring.fisher_to_compression_ratio(context.candidates, context.arrays, context.config)}


SCORERS: dict[str, Scorer] = {scorer.name: scorer for scorer in (
    Scorer("dai", "the published DAI formula (default)", _build_dai, diagnostics=_dai_diagnostics),
    Scorer("dai_paper", "[(F^d - beta F^g)|W| + c sqrt|W|](1 + alpha s): Fisher terms that act",
           _build_dai_paper, reads_cosine=_reads_cosine_when_weighted),
    Scorer("aligned_saliency", "(lambda_d F^d + lambda_g F^g) W^2 (1 + alpha s)", _build_aligned_saliency,
           required_files=_aligned_saliency_files, reads_cosine=_reads_cosine_when_weighted),
    Scorer("random", "seeded uniform scores (--seed)", _build_random),
    Scorer("magnitude", "|w|", _build_magnitude),
    _fisher_saliency("domain_fisher"),
    _fisher_saliency("general_fisher"),
    Scorer("wanda", "|W| ||X||_2 compared within each output row (Wanda; needs calibration data)", _build_wanda,
           needs_activations=True, budget="row"),
    Scorer("sparsegpt", "SparseGPT: OBS mask and update of the kept weights (needs calibration data)", None,
           needs_activations=True, updates_weights=True, budget="block", layer_pruner=_sparsegpt_layer),
)}
REFERENCE_SCORER = "magnitude"  # every mask reports how much of it this scorer's mask shares


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise InputError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[name]


def score_function(name: str, arrays: ArrayFn, config: DAIConfig, seed: int = 42,
                   candidates: Mapping[str, torch.Tensor] | None = None) -> ScoreFn:
    """The per-tensor score function of a registered score-based scorer (``candidates``: for the global
    Fisher mean)."""
    chosen = get_scorer(name)
    if chosen.build is None or chosen.needs_activations:
        raise InputError(f"{name} needs calibration data and prunes layer by layer; it has no score function")
    return chosen.build(ScoringContext(candidates or {}, arrays, config, seed))
