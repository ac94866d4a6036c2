"""Structured pruning: whole MLP channels or attention heads removed, leaving a smaller standard model.

A unit is what one index of a layer's inner dimension carries. An MLP channel c is row c of the tensors
that write the intermediate activation (Qwen3 gate_proj and up_proj, BERT intermediate.dense and its
bias; rows c and c + intermediate_size of ModernBERT's fused Wi) and column c of the tensor that reads
it (down_proj, output.dense, mlp.Wo). A query head h is rows h*d..(h+1)*d of q_proj and the same columns
of o_proj (d = head_dim). Which tensors those are, and the config field that counts the units, the
model's family adapter says (gaprune.families). Removing units slices those tensors and lowers that
field (intermediate_size, num_attention_heads) by the same count in every layer, so
``AutoModel.from_pretrained`` loads the result with no gaprune code.

A unit's score is the sum of its weights' scores: for Fisher saliency F w^2 that is the diagonal
estimate of the loss increase from removing the whole unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from gaprune.errors import InputError
from gaprune.families import Family, Units, family_of_names, known_styles
from gaprune.layers import layer_key, parameter_owner
from gaprune.masking import ScoreFn
from gaprune.options import UNIT_STRUCTURES


CONFIG_FIELDS = {"channels": "intermediate_size", "heads": "num_attention_heads"}  # as every known family names them
UNIT_LAYER_TYPES = {"channels": ["mlp"], "heads": ["attn_q", "attn_o"]}  # the tensors whose scores rank the units


@dataclass
class LayerUnits:
    """One layer's removable units: the tensors that carry them and the axis along which they lie."""

    layer: str  # 'layers.3', 'encoder.layer.3'
    slices: dict[str, int]  # parameter name -> axis
    units: int
    stacked: dict[str, int] = field(default_factory=dict)  # parameter name -> blocks of all units (absent: 1)


@dataclass
class UnitPlan:
    structure: str
    layers: list[LayerUnits]
    units: int  # per layer, the same in every layer
    width: int  # entries per unit along its axis: 1 for channels, head_dim for heads
    groups: int  # units form this many equal consecutive blocks, each losing the same count (GQA)
    config_field: str = ""  # the config field that counts the units (CONFIG_FIELDS[structure] if empty)


def _family_units(model: torch.nn.Module, structure: str) -> tuple[Family, Units]:
    """The model's family and its units of ``structure``, or an InputError saying why there are none."""
    if structure not in UNIT_STRUCTURES:
        raise InputError(f"unknown structure {structure!r}; choose from {', '.join(UNIT_STRUCTURES)}")
    family = family_of_names(name for name, _ in model.named_parameters())
    if family is None:
        raise InputError(f"--structure {structure} needs {known_styles()} parameter names; this model's are unknown")
    if structure in family.unavailable:
        raise InputError(f"--structure {structure} is not available for {family.name}-family models: "
                         f"{family.unavailable[structure]}")
    if structure not in family.units:
        raise InputError(f"--structure {structure} is not available for {family.name}-family models")
    return family, family.units[structure]


def unit_plan(model: torch.nn.Module, structure: str) -> UnitPlan:
    """Which tensors carry the ``structure``'s units in every layer of ``model``."""
    family, units = _family_units(model, structure)
    config = model.config
    width, groups = 1, 1
    if structure == "heads":
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or 1
    layers: dict[str, LayerUnits] = {}
    for name, param in model.named_parameters():
        for where in units.slices:
            if family.matches(name, [where.layer_type]) and (where.axis == 0 or param.dim() >= 2):
                key = layer_key(name, fallback_parts=2)
                entries = param.shape[where.axis]
                layer = layers.setdefault(key, LayerUnits(key, {}, entries // (width * where.stacked)))
                layer.slices[name] = where.axis
                if where.stacked > 1:
                    layer.stacked[name] = where.stacked
                if entries != where.stacked * layer.units * width:
                    count = f"{where.stacked} x {layer.units}" if where.stacked > 1 else str(layer.units)
                    raise InputError(f"{name} has {entries} entries along axis {where.axis}, "
                                     f"not {count} units of {width}")
    counts = {layer.units for layer in layers.values()}
    if not counts:
        raise InputError(f"no tensor of this {family.name}-style model carries {structure} under the known names")
    if len(counts) != 1:
        raise InputError(f"layers differ in their number of {structure} ({sorted(counts)}); "
                         f"a standard config needs one {units.config_field}")
    return UnitPlan(structure, list(layers.values()), counts.pop(), width, groups, units.config_field)


def units_to_remove(plan: UnitPlan, share: float) -> int:
    """``int(share * units)`` per layer, a multiple of the groups; at least one unit and one kept per group."""
    per_group = plan.units // plan.groups
    count = int(share * per_group + 1e-9) * plan.groups  # 0.58 of 100 is 58, not 57
    what = f"{plan.structure} ({plan.units} per layer" + (
        f", {per_group} per key/value group)" if plan.groups > 1 else ")")
    if count == 0:
        raise InputError(f"a share of {share:g} removes no {what}; the smallest step is {1 / per_group:.4g}")
    if count >= plan.units:
        raise InputError(f"a share of {share:g} leaves no {what}")
    return count


def unit_scores(candidates: Mapping[str, torch.Tensor], layer: LayerUnits, score_fn: ScoreFn) -> torch.Tensor:
    """Each unit's score: the sum of the scores of the weights it carries in ``candidates`` (biases are
    removed with their unit but have no scores of their own)."""
    total = torch.zeros(layer.units, dtype=torch.float64)
    for name, axis in layer.slices.items():
        if name not in candidates:
            continue
        weight = candidates[name]
        score = score_fn(name, weight).view(weight.shape).movedim(axis, 0)
        blocks = layer.stacked.get(name, 1)  # a unit's entries in each block of the fused tensor count together
        total += score.reshape(blocks, layer.units, -1).sum(dim=(0, 2), dtype=torch.float64).cpu()
    return total


def lowest_units(scores: torch.Tensor, count: int, groups: int = 1) -> torch.Tensor:
    """Sorted indices of the ``count`` lowest scores, ``count / groups`` from each consecutive block
    (ties go to the lower index)."""
    per_group = scores.numel() // groups
    order = torch.argsort(scores.view(groups, per_group), dim=1, stable=True)[:, :count // groups]
    offsets = torch.arange(groups).unsqueeze(1) * per_group
    return (order + offsets).flatten().sort().values


@torch.no_grad()
def remove_units(model: torch.nn.Module, plan: UnitPlan, removed: Mapping[str, torch.Tensor]) -> None:
    """Slice every layer's units in ``removed`` (layer -> indices, the same count everywhere) out of the
    model in place, and lower the config field to match."""
    counts = {len(indices) for indices in removed.values()}
    if len(counts) != 1 or set(removed) != {layer.layer for layer in plan.layers}:
        raise ValueError("remove_units needs the same number of units removed from every layer")
    kept_units = plan.units - counts.pop()
    for layer in plan.layers:
        keep = torch.ones(plan.units, dtype=torch.bool)
        keep[removed[layer.layer]] = False
        units = torch.nonzero(keep).flatten()
        index = (units.unsqueeze(1) * plan.width + torch.arange(plan.width)).flatten()
        for name, axis in layer.slices.items():
            blocks = layer.stacked.get(name, 1)  # the same units kept in each block of a fused tensor
            entries = torch.cat([index + block * plan.units * plan.width for block in range(blocks)])
            module, attribute = parameter_owner(model, name)
            old = getattr(module, attribute)
            setattr(module, attribute, torch.nn.Parameter(old.index_select(axis, entries.to(old.device)).contiguous(),
                                                          requires_grad=old.requires_grad))
            if isinstance(module, torch.nn.Linear):
                module.out_features, module.in_features = module.weight.shape
    setattr(model.config, plan.config_field or CONFIG_FIELDS[plan.structure], kept_units)
    if plan.structure == "heads":
        for module in model.modules():  # Qwen3 attention repeats each key/value head this many times
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = kept_units // plan.groups
