"""Layer types (mlp, attention, ...) as parameter names, and the parameters and modules they select.

The names of each layer type come from the model's family adapter (gaprune.families): Qwen3/Llama-style
decoders (``layers.N.mlp.gate_proj``), BERT-style encoders (``encoder.layer.N.intermediate.dense``),
ModernBERT (``layers.N.mlp.Wi``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from gaprune.errors import InputError
from gaprune.families import families, family_named, family_of_names, known_styles, strip_prefix
from gaprune.options import GRADIENTS, LAYER_TYPES


class _LayerPatterns(Mapping[str, dict[str, tuple[str, ...]]]):
    """family name -> layer type -> its name patterns, for every registered family."""

    def __getitem__(self, family: str) -> dict[str, tuple[str, ...]]:
        return family_named(family).layer_patterns()

    def __iter__(self) -> Iterator[str]:
        return iter([family.name for family in families()])

    def __len__(self) -> int:
        return len(families())


LAYER_PATTERNS = _LayerPatterns()


def detect_family(names: Iterable[str]) -> str | None:
    """The name of the family whose parameter names these are ('qwen3', 'bert', 'modernbert'), None when unknown."""
    family = family_of_names(names)
    return family.name if family else None


def name_matches(name: str, family: str | None, layer_types: Sequence[str]) -> bool:
    return family is not None and family_named(family).matches(name, layer_types)


def select_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]], layer_types: Sequence[str],
                      *, require: bool = True) -> dict[str, torch.Tensor]:
    """The candidates: parameters with 2+ dimensions whose name matches a selected layer type.

    With ``require`` an empty selection is an error, so an unknown model family never yields an empty mask.
    """
    unknown = [t for t in layer_types if t not in LAYER_TYPES]
    if unknown:
        raise InputError(f"unknown layer type(s) {', '.join(unknown)}; choose from {', '.join(LAYER_TYPES)}")
    named = list(named_parameters)
    family = family_of_names(n for n, _ in named)
    if family is not None:
        family.check_whole_tensors(layer_types)
    chosen = {n: p for n, p in named if p.dim() >= 2 and family is not None and family.matches(n, layer_types)}
    if require and not chosen:
        looks = f"{family.name}-style" if family else f"unknown; supported: {known_styles()}"
        raise InputError(f"no parameter with 2+ dimensions matches --sparsify_layers {' '.join(layer_types)} "
                         f"(model names look {looks})")
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


def blocks_path(model: torch.nn.Module) -> str:
    """Where the model keeps its sequence of transformer blocks (Qwen3/Llama ``layers``, BERT ``encoder.layer``),
    under a ``model.`` wrapper or not."""
    family = family_of_names(name for name, _ in model.named_parameters())
    for path in ([family.blocks, "model." + family.blocks] if family else []):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, torch.nn.ModuleList):
            return path
    raise InputError(f"calibration and depth pruning need {known_styles()} transformer blocks")


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's sequence of transformer blocks."""
    return model.get_submodule(blocks_path(model))
