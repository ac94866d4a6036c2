"""Model families: what gaprune knows of each architecture, one adapter per family.

An adapter says how to recognise its family from parameter names (and config.model_type), which names
make up each fine layer type (mlp_gate, attn_q, ...), where the transformer blocks are, which tensors carry
the units of structured pruning and which config field counts them (or why a structure is unavailable),
and the few facts the memory plan and the embedder need. gaprune.layers, gaprune.structure,
gaprune.calibration, gaprune.memory and gaprune.modeling ask the adapter; a new family is one more
``Family`` given to ``register``.

Names are matched with any leading ``model.`` removed, so checkpoints saved with or without the wrapper
prefix agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from gaprune.errors import InputError
from gaprune.options import LAYER_TYPES

# the groups of --sparsify_layers, each the fine types it stands for ('all': every fine type but final_norm)
GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp_gate", "mlp_up", "mlp_down"),
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "layernorm": ("norm_input", "norm_post_attn", "norm_qk"),
    "linear": ("mlp_gate", "mlp_up", "mlp_down", "attn_q", "attn_k", "attn_v", "attn_o"),
}
FINE_TYPES = tuple(t for t in LAYER_TYPES if t not in GROUPS and t != "all")


@dataclass(frozen=True)
class UnitSlice:
    """Where one tensor of a layer carries the units of a structure."""

    layer_type: str  # a fine layer type of the family
    axis: int  # 0: rows of a tensor that writes the units (and its bias); 1: columns of one that reads them
    stacked: int = 1  # the tensor holds this many blocks of all the units along the axis (a fused GLU: 2)


@dataclass(frozen=True)
class Units:
    """The tensors that carry a structure's units in every layer, and the config field that counts them."""

    slices: tuple[UnitSlice, ...]
    config_field: str


@dataclass(frozen=True)
class Family:
    name: str  # 'qwen3', 'bert', 'modernbert'
    style: str  # how messages call its names: 'Qwen3/Llama-style'
    signature: str  # a regex that some parameter name of this family matches, and none of another family
    model_types: tuple[str, ...]  # the config.model_type values of the family
    encoder: bool  # bidirectional: pads on the right and pools the mean by default
    blocks: str  # the module path of its transformer blocks (a ModuleList)
    fine_types: Mapping[str, tuple[str, ...]]  # fine layer type -> parameter-name patterns (every FINE_TYPES key)
    gated_mlp: bool  # the MLP multiplies a gate by an activation (autograd keeps 3 intermediate values, not 1)
    group_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # a group's own patterns
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # one tensor -> the fine types it holds
    units: Mapping[str, Units] = field(default_factory=dict)  # structure -> the tensors carrying its units
    unavailable: Mapping[str, str] = field(default_factory=dict)  # structure -> why it cannot be removed

    def patterns(self, layer_type: str) -> tuple[str, ...]:
        """The name patterns of a fine type, a group or 'all'."""
        if layer_type in self.group_patterns:
            return self.group_patterns[layer_type]
        members = GROUPS.get(layer_type) or (
            [t for t in FINE_TYPES if t != "final_norm"] if layer_type == "all" else [layer_type])
        return tuple(dict.fromkeys(p for member in members for p in self.fine_types[member]))

    def layer_patterns(self) -> dict[str, tuple[str, ...]]:
        return {layer_type: self.patterns(layer_type) for layer_type in LAYER_TYPES}

    def matches(self, name: str, layer_types: Sequence[str]) -> bool:
        name = strip_prefix(name)
        return any(re.search(p, name) for t in layer_types for p in self.patterns(t))

    def check_whole_tensors(self, layer_types: Sequence[str]) -> None:
        """An InputError when ``layer_types`` take part of a fused tensor (attn_q of ModernBERT's attn.Wqkv):
        its weights cannot be told apart by name, so the whole tensor or none of it is selected."""
        fine = {member for t in layer_types for member in GROUPS.get(t, FINE_TYPES if t == "all" else (t,))}
        for tensor, parts in self.fused.items():
            chosen = [part for part in parts if part in fine]
            if chosen and len(chosen) < len(parts):
                raise InputError(f"{' and '.join(chosen)} {'is' if len(chosen) == 1 else 'are'} only part of the fused "
                                 f"{tensor} of {self.style} models "
                                 f"({' + '.join(parts)} in one tensor): select {' '.join(parts)} together, or a "
                                 f"group (mlp, attention, linear)")


def strip_prefix(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


QWEN3 = Family(
    name="qwen3", style="Qwen3/Llama-style", signature=r"(^|\.)layers\.\d+\.(self_attn|mlp\.\w+_proj)\.",
    model_types=("qwen3",), encoder=False, blocks="layers", gated_mlp=True,
    fine_types={
        "mlp_gate": (r"gate_proj",), "mlp_up": (r"up_proj",), "mlp_down": (r"down_proj",),
        "attn_q": (r"q_proj",), "attn_k": (r"k_proj",), "attn_v": (r"v_proj",), "attn_o": (r"o_proj",),
        "norm_input": (r"input_layernorm",), "norm_post_attn": (r"post_attention_layernorm",),
        "norm_qk": (r"q_norm", r"k_norm"), "embed": (r"embed_tokens",), "final_norm": (r"^norm\.weight$",),
    },
    units={"channels": Units((UnitSlice("mlp_gate", 0), UnitSlice("mlp_up", 0), UnitSlice("mlp_down", 1)),
                             "intermediate_size"),
           "heads": Units((UnitSlice("attn_q", 0), UnitSlice("attn_o", 1)), "num_attention_heads")},
)

BERT = Family(
    name="bert", style="BERT-style", signature=r"(^|\.)encoder\.layer\.\d+\.",
    model_types=("bert",), encoder=True, blocks="encoder.layer", gated_mlp=False,
    fine_types={
        "mlp_gate": (), "mlp_up": (r"intermediate\.dense",),
        "mlp_down": (r"(?<!attention\.)output\.dense",),  # the layer's own output, not attention.output
        "attn_q": (r"attention\.self\.query",), "attn_k": (r"attention\.self\.key",),
        "attn_v": (r"attention\.self\.value",), "attn_o": (r"attention\.output\.dense",),
        "norm_input": (r"(?<!attention\.)output\.LayerNorm",), "norm_post_attn": (r"attention\.output\.LayerNorm",),
        "norm_qk": (), "embed": (r"word_embeddings",), "final_norm": (),
    },
    group_patterns={"layernorm": (r"LayerNorm",)},  # the embeddings' LayerNorm too
    units={"channels": Units((UnitSlice("mlp_up", 0), UnitSlice("mlp_down", 1)), "intermediate_size")},
    unavailable={"heads": "a BERT-family config derives the head size from hidden_size / num_attention_heads, "
                          "so fewer heads cannot be written as a standard checkpoint"},
)

# ModernBERT's fused tensors: q, k and v stacked along the rows of attn.Wqkv; the GLU's input half, then its
# gate half, along the rows of mlp.Wi (so channel c is rows c and c + intermediate_size)
_MODERNBERT_FUSED = {"attn.Wqkv": ("attn_q", "attn_k", "attn_v"), "mlp.Wi": ("mlp_up", "mlp_gate")}

MODERNBERT = Family(
    name="modernbert", style="ModernBERT-style", signature=r"(^|\.)layers\.\d+\.(attn|mlp)\.W",
    model_types=("modernbert",), encoder=True, blocks="layers", gated_mlp=True,
    fine_types={
        **{part: (re.escape(tensor),) for tensor, parts in _MODERNBERT_FUSED.items() for part in parts},
        "mlp_down": (r"mlp\.Wo",), "attn_o": (r"attn\.Wo",), "norm_input": (r"attn_norm",),
        "norm_post_attn": (r"mlp_norm",), "norm_qk": (), "embed": (r"tok_embeddings",),
        "final_norm": (r"^final_norm\.weight$",),
    },
    fused=_MODERNBERT_FUSED,
    units={"channels": Units((UnitSlice("mlp_up", 0, stacked=2), UnitSlice("mlp_down", 1)), "intermediate_size")},
    unavailable={"heads": "a ModernBERT config derives the head size from hidden_size / num_attention_heads, "
                          "so fewer heads cannot be written as a standard checkpoint"},
)

# listed in messages in this order; detection does not depend on it (the signatures exclude each other)
_FAMILIES: dict[str, Family] = {family.name: family for family in (MODERNBERT, QWEN3, BERT)}


def register(family: Family) -> None:
    """Make ``family`` known to every module that asks for a model's family."""
    missing = [t for t in FINE_TYPES if t not in family.fine_types]
    if missing:
        raise ValueError(f"family {family.name} has no patterns for {', '.join(missing)} (give () for none)")
    _FAMILIES[family.name] = family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> list[Family]:
    return list(_FAMILIES.values())


def family_named(name: str) -> Family:
    return _FAMILIES[name]


def known_styles() -> str:
    """'ModernBERT-style, Qwen3/Llama-style or BERT-style', for messages about unknown names."""
    styles = [family.style for family in _FAMILIES.values()]
    return ", ".join(styles[:-1]) + " or " + styles[-1] if len(styles) > 1 else styles[0]


def family_of_names(names: Iterable[str]) -> Family | None:
    """The family whose signature one of the parameter ``names`` matches, None when none does."""
    names = [strip_prefix(n) for n in names]
    return next((family for family in _FAMILIES.values()
                 if any(re.search(family.signature, n) for n in names)), None)


def family_of_config(config) -> Family | None:
    """The family of a config's model_type, None when no family lists it."""
    model_type = getattr(config, "model_type", None)
    return next((family for family in _FAMILIES.values() if model_type in family.model_types), None)
