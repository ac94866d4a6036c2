"""Structured pruning: whole MLP channels or attention heads removed, leaving a smaller standard model.

A unit is what one index of a layer's inner dimension carries. An MLP channel c is row c of the tensors
that write the intermediate activation (Qwen3 gate_proj and up_proj, BERT intermediate.dense and its
bias) and column c of the tensor that reads it (down_proj, output.dense). A query head h is rows
h*d..(h+1)*d of q_proj and the same columns of o_proj (d = head_dim). Removing units slices those
tensors and lowers one config field (intermediate_size, num_attention_heads) by the same count in
every layer, so ``AutoModel.from_pretrained`` loads the result with no gaprune code.

A unit's score is the sum of its weights' scores: for Fisher saliency F w^2 that is the diagonal
estimate of the loss increase from removing the whole unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from gaprune.errors import InputError
from gaprune.layers import detect_family, layer_key, name_matches, parameter_owner
from gaprune.masking import ScoreFn
from gaprune.options import STRUCTURES


# structure -> (layer type of gaprune.layers, axis along which the units lie): rows of the tensors that write
# the units (with their biases), columns of the tensor that reads them (its bias is per output: kept)
_UNIT_SLICES: dict[str, list[tuple[str, int]]] = {
    "channels": [("mlp_gate", 0), ("mlp_up", 0), ("mlp_down", 1)],
    "heads": [("attn_q", 0), ("attn_o", 1)],
}
_FAMILIES = {"channels": ("qwen3", "bert"), "heads": ("qwen3",)}
CONFIG_FIELDS = {"channels": "intermediate_size", "heads": "num_attention_heads"}
UNIT_LAYER_TYPES = {"channels": ["mlp"], "heads": ["attn_q", "attn_o"]}  # the tensors whose scores rank the units
_WHY_NOT = {("bert", "heads"): "a BERT-family config derives the head size from hidden_size / num_attention_heads, "
                               "so fewer heads cannot be written as a standard checkpoint"}


@dataclass
class LayerUnits:
    """One layer's removable units: the tensors that carry them and the axis along which they lie."""

    layer: str  # 'layers.3', 'encoder.layer.3'
    slices: dict[str, int]  # parameter name -> axis
    units: int


@dataclass
class UnitPlan:
    structure: str
    layers: list[LayerUnits]
    units: int  # per layer, the same in every layer
    width: int  # entries per unit along its axis: 1 for channels, head_dim for heads
    groups: int  # units form this many equal consecutive blocks, each losing the same count (GQA)


def unit_plan(model: torch.nn.Module, structure: str) -> UnitPlan:
    """Which tensors carry the ``structure``'s units in every layer of ``model``."""
    if structure not in STRUCTURES:
        raise InputError(f"unknown structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    named = dict(model.named_parameters())
    family = detect_family(named)
    if (family, structure) in _WHY_NOT:
        raise InputError(f"--structure {structure} is not available for {family}-family models: "
                         f"{_WHY_NOT[family, structure]}")
    if family not in _FAMILIES[structure]:
        raise InputError(f"--structure {structure} needs Qwen3/Llama-style or BERT-style parameter names; "
                         f"this model's are unknown")
    config = model.config
    width, groups = 1, 1
    if structure == "heads":
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = config.num_key_value_heads
    layers: dict[str, LayerUnits] = {}
    for name, param in named.items():
        for layer_type, axis in _UNIT_SLICES[structure]:
            if name_matches(name, family, [layer_type]) and (axis == 0 or param.dim() >= 2):
                key = layer_key(name, fallback_parts=2)
                layer = layers.setdefault(key, LayerUnits(key, {}, param.shape[axis] // width))
                layer.slices[name] = axis
                if param.shape[axis] != layer.units * width:
                    raise InputError(f"{name} has {param.shape[axis]} entries along axis {axis}, "
                                     f"not {layer.units} units of {width}")
    counts = {layer.units for layer in layers.values()}
    if not counts:
        raise InputError(f"no tensor of this {family}-style model carries {structure} under the known names")
    if len(counts) != 1:
        raise InputError(f"layers differ in their number of {structure} ({sorted(counts)}); "
                         f"a standard config needs one {CONFIG_FIELDS[structure]}")
    return UnitPlan(structure, list(layers.values()), counts.pop(), width, groups)


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
        total += score.reshape(layer.units, -1).sum(dim=1, dtype=torch.float64).cpu()
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
            module, attribute = parameter_owner(model, name)
            old = getattr(module, attribute)
            setattr(module, attribute, torch.nn.Parameter(old.index_select(axis, index.to(old.device)).contiguous(),
                                                          requires_grad=old.requires_grad))
            if isinstance(module, torch.nn.Linear):
                module.out_features, module.in_features = module.weight.shape
    setattr(model.config, CONFIG_FIELDS[plan.structure], kept_units)
    if plan.structure == "heads":
        for module in model.modules():  # Qwen3 attention repeats each key/value head this many times
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = kept_units // plan.groups
