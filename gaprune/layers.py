"""Layer types (mlp, attention, ...) as parameter-name patterns, per model family.

Two naming families are known: Qwen3/Llama-style decoders (``layers.N.mlp.gate_proj``) and
BERT-style encoders (``encoder.layer.N.intermediate.dense``). Names are matched with any leading
``model.`` removed, so checkpoints saved with or without the wrapper prefix agree.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from gaprune.errors import InputError
from gaprune.options import GRADIENTS, LAYER_TYPES

_FINE_TYPES: dict[str, dict[str, list[str]]] = {
    "qwen3": {
        "mlp_gate": [r"gate_proj"],
        "mlp_up": [r"up_proj"],
        "mlp_down": [r"down_proj"],
        "attn_q": [r"q_proj"],
        "attn_k": [r"k_proj"],
        "attn_v": [r"v_proj"],
        "attn_o": [r"o_proj"],
        "norm_input": [r"input_layernorm"],
        "norm_post_attn": [r"post_attention_layernorm"],
        "norm_qk": [r"q_norm", r"k_norm"],
        "embed": [r"embed_tokens"],
        "final_norm": [r"^norm\.weight$"],
    },
    "bert": {
        "mlp_gate": [],
        "mlp_up": [r"intermediate\.dense"],
        "mlp_down": [r"(?<!attention\.)output\.dense"],  # the layer's own output, not attention.output
        "attn_q": [r"attention\.self\.query"],
        "attn_k": [r"attention\.self\.key"],
        "attn_v": [r"attention\.self\.value"],
        "attn_o": [r"attention\.output\.dense"],
        "norm_input": [r"(?<!attention\.)output\.LayerNorm"],
        "norm_post_attn": [r"attention\.output\.LayerNorm"],
        "norm_qk": [],
        "embed": [r"word_embeddings"],
        "final_norm": [],
    },
}

_GROUPS = {
    "mlp": ["mlp_gate", "mlp_up", "mlp_down"],
    "attention": ["attn_q", "attn_k", "attn_v", "attn_o"],
    "layernorm": ["norm_input", "norm_post_attn", "norm_qk"],
    "linear": ["mlp_gate", "mlp_up", "mlp_down", "attn_q", "attn_k", "attn_v", "attn_o"],
}


def _family_patterns(family: str) -> dict[str, list[str]]:
    fine = _FINE_TYPES[family]
    types = dict(fine)
    for group, members in _GROUPS.items():
        types[group] = [p for member in members for p in fine[member]]
    if family == "bert":
        types["layernorm"] = [r"LayerNorm"]
    types["all"] = [p for name, pats in fine.items() if name != "final_norm" for p in pats]
    return types


LAYER_PATTERNS: dict[str, dict[str, list[str]]] = {family: _family_patterns(family) for family in _FINE_TYPES}


def strip_prefix(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def detect_family(names: Iterable[str]) -> str | None:
    """'qwen3' for Qwen3/Llama-style names, 'bert' for BERT-style names, None when neither."""
    names = [strip_prefix(n) for n in names]
    if any(re.search(r"(^|\.)layers\.\d+\.(mlp|self_attn)\.", n) for n in names):
        return "qwen3"
    if any(re.search(r"(^|\.)encoder\.layer\.\d+\.", n) for n in names):
        return "bert"
    return None


def name_matches(name: str, family: str | None, layer_types: Sequence[str]) -> bool:
    if family is None:
        return False
    name = strip_prefix(name)
    patterns = LAYER_PATTERNS[family]
    return any(re.search(p, name) for t in layer_types for p in patterns[t])


def select_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]], layer_types: Sequence[str],
                      *, require: bool = True) -> dict[str, torch.Tensor]:
    """The candidates: parameters with 2+ dimensions whose name matches a selected layer type.

    With ``require`` an empty selection is an error, so an unknown model family never yields an empty mask.
    """
    unknown = [t for t in layer_types if t not in LAYER_TYPES]
    if unknown:
        raise InputError(f"unknown layer type(s) {', '.join(unknown)}; choose from {', '.join(LAYER_TYPES)}")
    named = list(named_parameters)
    family = detect_family(n for n, _ in named)
    chosen = {n: p for n, p in named if p.dim() >= 2 and name_matches(n, family, layer_types)}
    if require and not chosen:
        known = "Qwen3/Llama-style or BERT-style" if family is None else f"{family}-style"
        raise InputError(f"no parameter with 2+ dimensions matches --sparsify_layers {' '.join(layer_types)} "
                         f"(model names look {'unknown; supported: ' + known if family is None else known})")
    return chosen


def layer_key(name: str, fallback_parts: int) -> str:
    """'layers.3' / 'encoder.layer.3' for per-layer parameters, else the first ``fallback_parts`` name parts."""
    name = strip_prefix(name)
    match = re.match(r"(.*?\blayers?\.\d+)(\.|$)", name)
    if match:
        return match.group(1)
    return ".".join(name.split(".")[:fallback_parts])




@contextmanager
def gradients_of(model: torch.nn.Module, layer_types: Sequence[str], gradients: str) -> Iterator[int]:
    """``selected``: only the parameters of ``layer_types`` require gradients inside the block (the others cost
    backward time and gradient memory, and the scoring stages then report nothing for them); ``all``: the
    flags are left as they are. Yields how many weights were frozen; the flags are restored afterwards."""
    if gradients not in GRADIENTS:
        raise InputError(f"gradients must be one of {', '.join(GRADIENTS)}, got {gradients!r}")
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen = 0
    if gradients == "selected":
        chosen = select_parameters(model.named_parameters(), layer_types)
        for name, parameter in model.named_parameters():
            if name not in chosen and parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    try:
        yield frozen
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(before[name])


def _embedding_layers(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Embedding)]


def embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the model's embedding layers (vocabulary, and BERT's position and token types), whose
    gradients are sparse while scoring. This assumes nothing else uses them (no tied output projection:
    embedding models have none)."""
    return [module.weight for module in _embedding_layers(model)]


@contextmanager
def sparse_embedding_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, embedding layers give sparse gradients: only the rows of the batch's tokens. A dense
    one is a vocabulary-sized array at every backward pass (Qwen3-Embedding-8B: 621M weights) and holds
    nothing but zeros outside those rows. The flags are restored afterwards."""
    embeddings = _embedding_layers(model)
    before = [module.sparse for module in embeddings]
    for module in embeddings:
        module.sparse = True
    try:
        yield
    finally:
        for module, sparse in zip(embeddings, before):
            module.sparse = sparse


def parameter_owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module holding a named parameter, and the parameter's attribute name on it."""
    path, _, attribute = name.rpartition(".")
    return model.get_submodule(path), attribute


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's sequence of transformer blocks (Qwen3/Llama ``layers``, BERT ``encoder.layer``)."""
    for path in ("layers", "encoder.layer", "model.layers"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise InputError("activation-aware pruning needs Qwen3/Llama-style or BERT-style transformer blocks")
