"""A pruning request as one value, checked whole when it is made.

SparseModel.py and compare.py build a PruneSpec from their flags, the Python API takes one, and
example_usage.sh checks one (``SparseModel.py --dry_run``) before its first stage. Construction refuses
what cannot work (ranges, combinations, options of pruners that are not used) with the CLI's message;
``notes()`` lists what is legal but useless or ignored, for the caller to log once. What needs the model
(the N:M width of every candidate layer, the units a share removes) is ``check_model``, run before any
weights are touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from typing import Sequence

import torch

from gaprune.budget import Shape, reachable
from gaprune.checks import file_path, integer, layer_type_list, number_in, one_of, whole_number
from gaprune.errors import InputError
from gaprune.families import family_of_names
from gaprune.layers import select_parameters, transformer_blocks
from gaprune.options import (BLOCK_MEASURES, BUDGET_STRATEGIES, DEFAULT_SCORER, DISTILL_LOSSES, GROUP_ORDERS,
                             LAYER_TYPES, LAYERS, NATURAL_ORDER, OWN_TARGET, RECONSTRUCTION_TARGETS, STRUCTURES,
                             TOKEN_WEIGHTINGS, UNIFORM_SHARES, UNIFORM_WEIGHTING, UNSTRUCTURED)
from gaprune.patterns import Pattern, parse_pattern
from gaprune.results import FILE_KINDS
from gaprune.scorers import SCORERS, get_scorer
from gaprune.coefficients import DAIConfig
from gaprune.structure import CONFIG_FIELDS, unit_plan, units_to_remove

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SCORER = BLOCK_MEASURES[0]  # block_influence (ShortGPT)
CALIBRATION_IGNORED = ("calibration flags are only used by wanda, sparsegpt, --reconstruct and the block measurements "
                       "of --structure layers; ignored")
ROUNDING_NOTE = 0.01  # a structured share that rounds further than this from what was asked is noted
NO_CALIBRATION = "wanda, sparsegpt and --reconstruct need --calibration_data and/or --general_calibration_data"
NO_STATISTICS = ("--calibration_weighting weighs the calibration statistics of wanda, sparsegpt and --reconstruct; "
                 "this run has none")
PRUNER_OPTIONS = ("layer_shares", "group_order", "calibration_weighting", "reconstruction_target")  # in order
# The scorer coefficients each score-based scorer reads (DAIConfig's fields); the others read none.
COEFFICIENTS_READ = {
    "dai": ("beta", "compression_weight", "score_postproc", "score_temperature", "fusion_alpha", "fusion_beta"),
    "dai_paper": ("beta", "compression_weight", "alignment_weight", "fisher_norm"),
    "aligned_saliency": ("alignment_weight", "domain_weight", "general_weight", "fisher_norm"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreFiles:
    """The results JSON paths of the scoring stages (fisher.py on each side, gradient.py); any may be absent."""

    general_fisher: str | None = None
    domain_fisher: str | None = None
    alignment: str | None = None

    def __post_init__(self):
        for side in FILE_KINDS:
            file_path(getattr(self, side), f"--{side}_scores", optional=True)

    def paths(self) -> dict[str, str | None]:
        return {side: getattr(self, side) for side in FILE_KINDS}

    def given(self) -> set[str]:
        return {side for side, path in self.paths().items() if path}


def _file_or_texts(value: object, name: str) -> None:
    if value is None or (isinstance(value, str) and value):
        return
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(isinstance(t, str) for t in value):
        return
    raise InputError(f"{name} must be a triple file's path or a list of texts, got {value!r:.80}")


def calibration_source(value: str | Sequence[str] | None) -> str | None:
    """How records name a calibration side: its file, or how many texts were given in Python."""
    return value if value is None or isinstance(value, str) else f"{len(value)} texts given in Python"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationSpec:
    """The calibration texts of Wanda, SparseGPT and reconstruction: for each side a triple file (its first
    ``samples`` triples give 3 texts each) or a list of texts, and how they are used."""

    domain_data: str | Sequence[str] | None = None
    general_data: str | Sequence[str] | None = None
    samples: int = 128  # triples per file; each gives 3 texts
    mix: float | None = None  # share of the general side (None: 0.5 with both files, else the one given)
    max_length: int | None = None  # tokens per text (None: the model's limit)
    batch_size: int = 8
    weighting: str = UNIFORM_WEIGHTING  # or "loss_gradient"

    def __post_init__(self):
        _file_or_texts(self.domain_data, "--calibration_data")
        _file_or_texts(self.general_data, "--general_calibration_data")
        if not (self.domain_data or self.general_data):
            raise InputError(NO_CALIBRATION)
        whole_number(self.samples, "--calibration_samples")
        whole_number(self.batch_size, "--calibration_batch_size")
        if self.max_length is not None:
            whole_number(self.max_length, "--calibration_max_length")
        one_of(self.weighting, "--calibration_weighting", TOKEN_WEIGHTINGS)
        if self.mix is not None:
            mix = number_in(self.mix, "--calibration_mix")
            if (mix > 0 and not self.general_data) or (mix < 1 and not self.domain_data):
                raise InputError(f"--calibration_mix {mix:g} needs both --calibration_data and "
                                 f"--general_calibration_data")

    @property
    def general_share(self) -> float:
        """The general side's share of the blended statistics."""
        if self.mix is not None:
            return float(self.mix)
        return 0.5 if self.domain_data and self.general_data else float(bool(self.general_data))

    def files(self) -> dict[str, str | Sequence[str]]:
        """side -> triple file or texts, for the sides blended at a share above 0 (a side at 0 is not run)."""
        weights = {"domain": 1.0 - self.general_share, "general": self.general_share}
        return {side: path for side, path in (("domain", self.domain_data), ("general", self.general_data))
                if path and weights[side] > 0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """What to prune and how. ``sparsity`` is the share of the candidate weights to zero (with an N:M
    ``pattern`` it is N/M, and may be left at 0), or with a ``structure`` the share of every layer's
    channels or heads to remove, or of the transformer blocks (``layers``: or ``block_count`` of them, chosen
    by ``block_scorer``)."""

    scorer: str = DEFAULT_SCORER
    sparsity: float = 0.0
    pattern: str = UNSTRUCTURED  # or "2:4", "4:8"
    structure: str = UNSTRUCTURED  # or "channels", "heads", "layers"
    layer_types: tuple[str, ...] = ("mlp",)
    strategy: str = "global"  # the budget of score-based masks: global, or uniform (rho_min..rho_max per layer)
    rho_min: float = 0.05
    rho_max: float = 0.95
    seed: int = 42
    config: DAIConfig = dataclasses.field(default_factory=DAIConfig)
    layer_shares: str = UNIFORM_SHARES
    group_order: str = NATURAL_ORDER
    reconstruct: bool = False
    reconstruction_target: str = OWN_TARGET
    calibration: CalibrationSpec | None = None
    block_scorer: str = DEFAULT_BLOCK_SCORER  # layers: a measurement (BLOCK_MEASURES) or a score-based scorer's sum
    block_count: int | None = None  # layers: how many blocks go (instead of the share ``sparsity``)
    target_speedup: float | None = None  # a budget: this many times fewer FLOPs per token (layers and channels)
    target_params: float | None = None  # a budget: at most this share of the transformer's weights kept
    sequence_length: int = 256  # tokens per text in the budget's cost model

    def __post_init__(self):
        self._check_values()
        if self.budgeted:
            self._check_budget()
        elif self.structure == UNSTRUCTURED:
            self._check_masking()
        elif self.structure == LAYERS:
            self._check_depth()
        else:
            self._check_units()
        if self.structure != LAYERS and not self.budgeted and (self.block_scorer != DEFAULT_BLOCK_SCORER or
                                                               self.block_count is not None):
            raise InputError("--block_scoring and --num_layers_removed choose whole layers; give --structure layers")

    @property
    def amount_flag(self) -> str:
        return "--unstructured_pct" if self.structure == UNSTRUCTURED else "--structured_pct"

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def share(self) -> float:
        """The share pruned: ``sparsity``, or N/M under an N:M pattern."""
        pattern = self.parsed_pattern
        return pattern.n / pattern.m if pattern.structured else self.sparsity

    @property
    def chosen(self):
        return get_scorer(self.scorer)

    @property
    def calibrated(self) -> bool:
        """Whether the request prunes layer by layer on calibration texts (Wanda, SparseGPT, reconstruction)."""
        return self.structure == UNSTRUCTURED and (self.chosen.needs_activations or self.reconstruct)

    @property
    def budgeted(self) -> bool:
        """Whether the structures are chosen to meet a budget (--target_speedup, --target_params)."""
        return self.target_speedup is not None or self.target_params is not None

    @property
    def uses_texts(self) -> bool:
        """Whether the request reads calibration texts: calibrated pruning, or blocks measured on them."""
        measured = self.block_scorer in BLOCK_MEASURES
        return self.calibrated or (self.structure == LAYERS and measured) or (
            self.budgeted and measured and self.calibration is not None)

    def scorers_used(self) -> list[str]:
        """The registered scorers whose score files this request reads: the scorer, and the one that sets the
        layer shares of an activation-aware pruner (layers: the scorer whose scores a block sums, if any)."""
        if self.structure == LAYERS:
            return [] if self.block_scorer in BLOCK_MEASURES else [self.block_scorer]
        return [self.scorer] + ([self.layer_shares] if self.layer_shares != UNIFORM_SHARES else [])

    def blocks_to_remove(self, blocks: int) -> int:
        """layers: how many of ``blocks`` go, at least one and not all."""
        count = self.block_count if self.block_count is not None else round(self.sparsity * blocks)
        asked = (f"--num_layers_removed {count}" if self.block_count is not None
                 else f"--structured_pct {self.sparsity:g}")
        if count < 1:
            raise InputError(f"{asked} removes no layer of {blocks}; the smallest step is {1 / blocks:.4g}")
        if count >= blocks:
            raise InputError(f"{asked} leaves no layer of {blocks}")
        return count

    def pruner_options(self) -> dict[str, str]:
        """The options of Wanda's and SparseGPT's masks and of the calibration statistics that differ from their
        defaults, by name: what records, folder names and report rows mention (nothing at the defaults)."""
        weighting = self.calibration.weighting if self.calibration else UNIFORM_WEIGHTING
        options = dict(zip(PRUNER_OPTIONS, ((self.layer_shares, UNIFORM_SHARES), (self.group_order, NATURAL_ORDER),
                                            (weighting, UNIFORM_WEIGHTING),
                                            (self.reconstruction_target, OWN_TARGET))))
        return {key: value for key, (value, default) in options.items() if value != default}

    def _check_values(self) -> None:
        """Each field on its own: types, ranges and names."""
        if not isinstance(self.scorer, str):
            raise InputError(f"scorer must be a scorer's name, got {self.scorer!r}")
        get_scorer(self.scorer)
        one_of(self.structure, "--structure", (UNSTRUCTURED, *STRUCTURES))
        number_in(self.sparsity, self.amount_flag)
        object.__setattr__(self, "layer_types", layer_type_list(self.layer_types, LAYER_TYPES))
        one_of(self.strategy, "--layer_budget_strategy", BUDGET_STRATEGIES)
        number_in(self.rho_min, "--rho_min")
        if not self.rho_min <= number_in(self.rho_max, "--rho_max"):
            raise InputError(f"need 0 <= --rho_min <= --rho_max <= 1, got {self.rho_min} and {self.rho_max}")
        integer(self.seed, "--seed")
        if not isinstance(self.config, DAIConfig):
            raise InputError(f"config must be a DAIConfig, got {type(self.config).__name__}")
        self.config.check()
        if not isinstance(self.reconstruct, bool):
            raise InputError(f"reconstruct must be True or False, got {self.reconstruct!r}")
        if self.calibration is not None and not isinstance(self.calibration, CalibrationSpec):
            raise InputError(f"calibration must be a CalibrationSpec, got {type(self.calibration).__name__}")
        self.parsed_pattern  # noqa: B018 (parsing is the check)
        one_of(self.group_order, "--group_order", GROUP_ORDERS)
        one_of(self.reconstruction_target, "--reconstruction_target", RECONSTRUCTION_TARGETS)

    def _check_units(self) -> None:
        """--structure channels/heads: whole units by a score-based scorer; mask options do not apply."""
        if not 0.0 < self.sparsity < 1.0:
            raise InputError(f"--structure {self.structure} needs --structured_pct between 0 and 1 (exclusive), "
                             f"got {self.sparsity}")
        if self.pattern != UNSTRUCTURED or self.reconstruct:
            raise InputError(f"--structure {self.structure} removes whole units; --sparsity_pattern and --reconstruct "
                             f"apply to masks")
        for flag, value, default in (("--layer_shares", self.layer_shares, UNIFORM_SHARES),
                                     ("--group_order", self.group_order, NATURAL_ORDER),
                                     ("--reconstruction_target", self.reconstruction_target, OWN_TARGET)):
            if value != default:
                raise InputError(f"{flag} applies to masks; --structure {self.structure} removes whole units")
        if self.chosen.needs_activations:
            raise InputError(f"--structure {self.structure} needs a score-based scorer, not {self.scorer}")
        if self.layer_types != ("mlp",):
            raise InputError(f"--sparsify_layers chooses masked weights; --structure {self.structure} removes "
                             f"{CONFIG_FIELDS[self.structure]} units from the tensors that carry them")
        if self.strategy != "global":
            raise InputError(f"--layer_budget_strategy applies to masks; --structure {self.structure} removes the "
                             f"same count from every layer")
        if self.calibration is not None and self.calibration.weighting != UNIFORM_WEIGHTING:
            raise InputError(NO_STATISTICS)

    def _check_budget(self) -> None:
        """A budget picks the layers and channels itself from a score-based scorer's scores: no share, structure or
        mask flag applies."""
        if self.target_speedup is not None and number_in(self.target_speedup, "--target_speedup", 1.0, 1000.0) == 1:
            raise InputError("--target_speedup 1 asks for nothing: give a speed-up above 1, e.g. 2")
        if self.target_params is not None and not 0 < number_in(self.target_params, "--target_params") < 1:
            raise InputError(f"--target_params must be between 0 and 1 (exclusive), got {self.target_params}")
        whole_number(self.sequence_length, "--budget_sequence_length")
        for flag, asked in (("--structure", self.structure != UNSTRUCTURED),
                            ("--unstructured_pct/--structured_pct", self.sparsity != 0),
                            ("--num_layers_removed", self.block_count is not None), *self._weight_flags()):
            if asked:
                raise InputError(f"{flag} does not apply: --target_speedup/--target_params choose the layers and "
                                 f"channels that go themselves")
        if self.chosen.needs_activations:
            raise InputError(f"a budget ranks layers and channels by a score-based scorer's scores, not {self.scorer}")
        if self.block_scorer not in BLOCK_MEASURES:
            raise InputError(f"--block_scoring orders a budget's layers by a measurement "
                             f"({', '.join(BLOCK_MEASURES)}); without calibration texts they go by "
                             f"--unstructured_scoring's sums")

    def _weight_flags(self) -> tuple[tuple[str, bool], ...]:
        """The flags that choose or mask single weights, each with whether it was set away from its default:
        whole layers and budgets take none of them."""
        return (("--sparsity_pattern", self.pattern != UNSTRUCTURED), ("--reconstruct", self.reconstruct),
                ("--layer_shares", self.layer_shares != UNIFORM_SHARES),
                ("--group_order", self.group_order != NATURAL_ORDER),
                ("--reconstruction_target", self.reconstruction_target != OWN_TARGET),
                ("--sparsify_layers", self.layer_types != ("mlp",)),
                ("--layer_budget_strategy", self.strategy != "global"))

    def _check_depth(self) -> None:
        """--structure layers: a share or a count of whole blocks, chosen by a block scorer; the flags of masks and
        of the weight scorers do not apply."""
        if self.block_count is not None:
            whole_number(self.block_count, "--num_layers_removed")
            if self.sparsity:
                raise InputError("--structured_pct and --num_layers_removed both say how many layers go; give one")
        elif not 0.0 < self.sparsity < 1.0:
            raise InputError(f"--structure layers needs --structured_pct between 0 and 1 (exclusive) or "
                             f"--num_layers_removed, got {self.sparsity}")
        for flag, asked in (*self._weight_flags(), ("--unstructured_scoring", self.scorer != DEFAULT_SCORER)):
            if asked:
                raise InputError(f"{flag} applies to weights; --structure layers removes whole layers, chosen by "
                                 f"--block_scoring")
        if self.block_scorer not in BLOCK_MEASURES:
            if self.block_scorer not in SCORERS or get_scorer(self.block_scorer).needs_activations:
                score_based = [name for name, entry in SCORERS.items() if not entry.needs_activations]
                raise InputError(f"--block_scoring takes {', '.join(BLOCK_MEASURES)} or a score-based scorer "
                                 f"({', '.join(score_based)}), not {self.block_scorer!r}")
        elif self.calibration is None:
            raise InputError(f"--block_scoring {self.block_scorer} measures the layers on calibration texts: give "
                             f"--calibration_data and/or --general_calibration_data")
        if self.calibration is not None and self.calibration.weighting != UNIFORM_WEIGHTING:
            raise InputError(NO_STATISTICS)

    def _check_masking(self) -> None:
        """Masks: the share against the pattern, the calibration the pruner needs, and the pruner options."""
        pattern, chosen = self.parsed_pattern, self.chosen
        if pattern.structured and self.sparsity not in (0.0, self.share):
            raise InputError(f"--sparsity_pattern {self.pattern} prunes {self.share:g} of the weights; "
                             f"--unstructured_pct {self.sparsity:g} contradicts it")
        if chosen.updates_weights and self.reconstruct:
            raise InputError(f"{self.scorer} already updates the kept weights; --reconstruct would add nothing")
        if chosen.needs_activations and self.strategy != "global":
            raise InputError(f"{self.scorer} takes its share of each {chosen.budget}; --layer_budget_strategy does "
                             f"not apply")
        if pattern.structured and self.strategy != "global":
            raise InputError(f"--layer_budget_strategy spreads a share over layers; the {self.pattern} pattern "
                             f"fixes it in every group of {pattern.m}")
        if self.calibrated and self.share == 0:
            raise InputError(f"{self.scorer}{' with --reconstruct' if self.reconstruct else ''} at a share of 0 "
                             f"prunes nothing")
        if self.calibrated and self.calibration is None:
            raise InputError(NO_CALIBRATION)
        if not self.calibrated and self.calibration is not None and self.calibration.weighting != UNIFORM_WEIGHTING:
            raise InputError(NO_STATISTICS)
        self._check_layer_shares(pattern)
        self._check_group_order(pattern)
        if self.reconstruction_target != OWN_TARGET and not (self.reconstruct or chosen.layer_pruner is not None):
            raise InputError(f"--reconstruction_target {self.reconstruction_target} sets what updated weights "
                             f"reproduce: it needs sparsegpt or --reconstruct, not {self.scorer} alone")

    def _check_layer_shares(self, pattern: Pattern) -> None:
        if self.layer_shares == UNIFORM_SHARES:
            return
        if self.layer_shares not in SCORERS or get_scorer(self.layer_shares).needs_activations:
            score_based = ", ".join(name for name, entry in SCORERS.items() if not entry.needs_activations)
            raise InputError(f"--layer_shares takes {UNIFORM_SHARES} or a score-based scorer ({score_based}), "
                             f"not {self.layer_shares!r}")
        if not self.chosen.needs_activations:
            raise InputError(f"--layer_shares sets the layer shares of wanda and sparsegpt, not of {self.scorer} "
                             f"(score-based masks take a global or uniform budget)")
        if pattern.structured:
            raise InputError(f"--layer_shares {self.layer_shares} moves the share between layers; the {self.pattern} "
                             f"pattern fixes it in every layer")

    def _check_group_order(self, pattern: Pattern) -> None:
        if self.group_order == NATURAL_ORDER:
            return
        if self.chosen.layer_pruner is None:
            raise InputError(f"--group_order sets the order of sparsegpt's N:M groups, not of {self.scorer}")
        if not pattern.structured:
            raise InputError("--group_order orders the groups of an N:M pattern; give --sparsity_pattern 2:4 or 4:8")

    def check_scores(self, scores: ScoreFiles) -> None:
        """Every score file the scorers of this request cannot run without is among ``scores``."""
        if not isinstance(scores, ScoreFiles):
            raise InputError(f"scores must be a ScoreFiles, got {type(scores).__name__}")
        for name in self.scorers_used():
            get_scorer(name).check(self.config, scores.given())

    def reads_cosine(self) -> bool:
        """Whether a scorer of this request reads the cosine arrays of gradient.py's cosine modes."""
        return any(get_scorer(name).reads_cosine(self.config) for name in self.scorers_used())

    def notes(self) -> list[str]:
        """What is legal but prunes nothing, everything, or ignores a setting: one warning line each."""
        notes = self.share_notes()
        if not self.uses_texts and self.calibration is not None:
            notes.append(CALIBRATION_IGNORED)
        unread = self.unread_coefficients()
        if unread:
            reader = self.block_scorer if self.structure == LAYERS else self.scorer
            notes.append(f"{', '.join('--' + name for name in unread)}: not read by {reader}; ignored")
        return notes

    def share_notes(self) -> list[str]:
        """A share that prunes nothing or every weight, bounds a global budget ignores, and a budget whose layers
        go by weight-score sums."""
        notes = []
        if self.budgeted and not self.uses_texts:
            notes.append(f"a budget without calibration texts removes layers by {self.scorer}'s weight sums, which "
                         f"tend to pick the last layers (the worst choice on held-out data): give --calibration_data "
                         f"so that {self.block_scorer} orders them")
        if self.structure == UNSTRUCTURED and self.share == 0 and not self.budgeted:
            notes.append(f"{self.amount_flag} 0 prunes nothing: the folder will hold an unpruned copy (pass e.g. "
                         f"{self.amount_flag} 0.5 to zero half of the {'/'.join(self.layer_types)} weights)")
        if self.structure == UNSTRUCTURED and self.share == 1:
            notes.append(f"{self.amount_flag} 1 zeroes every {'/'.join(self.layer_types)} weight")
        if self.strategy == "global" and (self.rho_min, self.rho_max) != (0.05, 0.95):
            notes.append("--rho_min and --rho_max bound the uniform strategy's layer shares; the global budget "
                         "ignores them")
        return notes

    def unread_coefficients(self) -> list[str]:
        """The coefficients set away from their defaults that no scorer of this request reads."""
        read = set(COEFFICIENTS_READ.get(self.block_scorer if self.structure == LAYERS else self.scorer, ()))
        if self.layer_shares != UNIFORM_SHARES:
            read |= set(COEFFICIENTS_READ.get(self.layer_shares, ()))
        defaults = DAIConfig()
        return [field.name for field in dataclasses.fields(DAIConfig)
                if getattr(self.config, field.name) != getattr(defaults, field.name) and field.name not in read]

    def check_model(self, model: torch.nn.Module) -> list[str]:
        """What needs the model's shapes (a model on the meta device will do): the candidate layers exist, an
        N:M group fits every candidate row, a structure's share removes some units and keeps some. Returns
        warnings (a share that rounds away from what was asked)."""
        if self.budgeted:
            return self._check_budget_reachable(model)
        if self.structure == LAYERS:
            blocks = len(transformer_blocks(model))
            count = self.blocks_to_remove(blocks)
            if self.block_count is None and abs(count / blocks - self.sparsity) > ROUNDING_NOTE:
                return [f"--structured_pct {self.sparsity:g} removes {count} of {blocks} layers ({count / blocks:.4g})"]
            return []
        if self.structure != UNSTRUCTURED:
            plan = unit_plan(model, self.structure)
            count = units_to_remove(plan, self.sparsity)
            if abs(count / plan.units - self.sparsity) > ROUNDING_NOTE:
                return [f"--structured_pct {self.sparsity:g} removes {count} of {plan.units} {self.structure} per "
                        f"layer ({count / plan.units:.4g})"]
            return []
        candidates = select_parameters(model.named_parameters(), self.layer_types)
        pattern = self.parsed_pattern
        if pattern.structured:
            for name, weight in candidates.items():
                if weight.shape[-1] % pattern.m:
                    raise InputError(f"the {self.pattern} pattern needs rows whose length is a multiple of "
                                     f"{pattern.m}; {name} has {weight.shape[-1]}")
        return []

    def _check_budget_reachable(self, model: torch.nn.Module) -> list[str]:
        """The budget is within what removing layers and channels can reach, by the cost model alone."""
        unit_plan(model, "channels")  # the family can lose channels
        shape = Shape.of(model.config, family_of_names(name for name, _ in model.named_parameters()).gated_mlp)
        speedup, params_kept = reachable(shape, self.sequence_length)
        if self.target_speedup is not None and self.target_speedup > speedup:
            raise InputError(f"--target_speedup {self.target_speedup:g} is beyond any plan: removing all but one of "
                             f"{shape.blocks} layers and 75% of the channels reaches {speedup:.2f}x")
        if self.target_params is not None and self.target_params < params_kept:
            raise InputError(f"--target_params {self.target_params:g} is beyond any plan: the smallest keeps "
                             f"{params_kept:.1%} of the weights")
        return []


def applicable_options(scorer: str, reconstruct: bool, layer_shares: str, group_order: str,
                       reconstruction_target: str) -> dict[str, str]:
    """The pruner options a request for ``scorer`` keeps when one set of flags serves several scorers
    (compare.py's rows): layer shares for Wanda and SparseGPT, the group order for SparseGPT, the reconstruction
    target for SparseGPT or reconstruction; the others are reset to their defaults."""
    chosen = get_scorer(scorer)
    return {"layer_shares": layer_shares if chosen.needs_activations else UNIFORM_SHARES,
            "group_order": group_order if chosen.layer_pruner else NATURAL_ORDER,
            "reconstruction_target": reconstruction_target if chosen.layer_pruner or reconstruct else OWN_TARGET}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrainSpec:
    """How a pruned model is retrained: AdamW on the InfoNCE loss for ``steps`` steps, each batch mixing
    ``round(batch_size * general_ratio)`` general triples (when general data is given) into the domain ones."""

    steps: int = 100
    lr: float = 1e-5
    batch_size: int = 8
    warmup_steps: int = 10
    grad_accum: int = 1
    weight_decay: float = 0.0
    general_ratio: float = 0.25
    seed: int = 42
    distill_weight: float = 0.0  # lambda of the distillation term against a teacher's (the dense model's) embeddings
    distill_loss: str = DISTILL_LOSSES[0]

    def __post_init__(self):
        whole_number(self.steps, "--steps")
        if number_in(self.lr, "--lr", 0.0, math.inf) == 0:
            raise InputError("--lr must be above 0, got 0")
        whole_number(self.batch_size, "--batch_size")
        whole_number(self.warmup_steps, "--warmup_steps", 0)
        whole_number(self.grad_accum, "--grad_accum")
        number_in(self.weight_decay, "--weight_decay", 0.0, math.inf)
        if not 0.0 <= number_in(self.general_ratio, "--general_ratio") < 1.0:
            raise InputError(f"--general_ratio must be in [0, 1), got {self.general_ratio}")
        integer(self.seed, "--seed")
        number_in(self.distill_weight, "--distill_weight", 0.0, math.inf)
        one_of(self.distill_loss, "--distill_loss", DISTILL_LOSSES)

    @property
    def distills(self) -> bool:
        return self.distill_weight > 0

    def general_per_batch(self, with_general: bool) -> int:
        """General triples in each batch; refused when the ratio rounds to none, or to the whole batch."""
        if not with_general:
            return 0
        count = round(self.batch_size * self.general_ratio)
        if self.general_ratio > 0 and count == 0:
            raise InputError(f"--general_ratio {self.general_ratio} of --batch_size {self.batch_size} rounds to no "
                             f"general triple per batch; raise either")
        if count >= self.batch_size:
            raise InputError(f"--general_ratio {self.general_ratio} of --batch_size {self.batch_size} leaves no domain "
                             f"triple per batch; lower the ratio or raise the batch size")
        return count

    def notes(self) -> list[str]:
        if self.warmup_steps > self.steps:
            return [f"--warmup_steps {self.warmup_steps} is more than --steps {self.steps}: the learning rate never "
                    f"reaches --lr"]
        return []


# The requests the command-line flags make (SparseModel.py, compare.py), checked as the API's are.

def calibration_from_args(args: argparse.Namespace) -> CalibrationSpec | None:
    """The calibration the flags name (None when they name no file)."""
    if not (args.calibration_data or args.general_calibration_data):
        if args.calibration_weighting != UNIFORM_WEIGHTING:
            raise InputError(NO_STATISTICS)
        if args.calibration_mix is not None:
            log.warning("--calibration_mix blends calibration files; none was given: ignored")
        return None
    return CalibrationSpec(domain_data=args.calibration_data, general_data=args.general_calibration_data,
                           samples=args.calibration_samples, mix=args.calibration_mix,
                           max_length=args.calibration_max_length, batch_size=args.calibration_batch_size,
                           weighting=args.calibration_weighting)


def spec_from_args(args: argparse.Namespace, scorer: str, sparsity: float, config: DAIConfig,
                   for_this_scorer: bool = False, **depth) -> PruneSpec:
    """The pruning request the flags of SparseModel.py and compare.py make, checked whole; with
    ``for_this_scorer`` the pruner options and calibration texts ``scorer`` does not take are left out (compare.py);
    ``depth``: the block_scorer and block_count of --structure layers."""
    options = {"layer_shares": args.layer_shares, "group_order": args.group_order,
               "reconstruction_target": args.reconstruction_target}
    calibration = calibration_from_args(args)
    if for_this_scorer:
        options = applicable_options(scorer, args.reconstruct, **options)
        if not (get_scorer(scorer).needs_activations or args.reconstruct):  # the texts go to the rows that use them
            calibration = None
    return PruneSpec(scorer=scorer, sparsity=sparsity, pattern=args.sparsity_pattern, structure=args.structure,
                     layer_types=tuple(args.sparsify_layers), strategy=args.layer_budget_strategy,
                     rho_min=getattr(args, "rho_min", 0.05), rho_max=getattr(args, "rho_max", 0.95), seed=args.seed,
                     config=config, reconstruct=args.reconstruct, calibration=calibration, **options, **depth)


def coefficients_from_args(args: argparse.Namespace) -> DAIConfig:
    config = DAIConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DAIConfig)})
    config.check()
    return config


def score_files_from_args(args: argparse.Namespace) -> ScoreFiles:
    """The score files given as ``--<side>_scores``."""
    return ScoreFiles(**{side: getattr(args, f"{side}_scores") for side in FILE_KINDS})
