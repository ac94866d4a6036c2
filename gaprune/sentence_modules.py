"""The sentence-transformers modules of a model folder (modules.json) that gaprune applies when embedding.

gaprune embeds as SentenceTransformer does for Transformer, Pooling, Dense and Normalize, in that order
(Normalize last). A folder listing any other module, or these in another order, is refused with one line:
its embeddings would differ from SentenceTransformer's.
"""

from __future__ import annotations

import importlib
import json
import os

import torch
from safetensors.torch import load_file

from gaprune.errors import InputError, first_line

APPLIED = ("Transformer", "Pooling", "Dense", "Normalize")  # the order gaprune applies them in
EMBEDDING = "sentence_embedding"  # the features key a Dense module reads and writes by default
DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # sentence-transformers' default


class DenseLayer(torch.nn.Module):
    """sentence-transformers' Dense module: a linear layer and an activation on the pooled embedding (plus the
    input, or its projection, with ``use_residual``); its state dict has the same keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: torch.nn.Module,
                 use_residual: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation
        self.use_residual = use_residual
        if use_residual and in_features != out_features:
            self.residual = torch.nn.Linear(in_features, out_features, bias=False)

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


def read_modules(model_dir: str) -> list[dict]:
    """modules.json's entries, [] when the folder has none; an InputError for a module gaprune does not apply
    or an order it does not apply them in."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            modules = json.load(handle)
        kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"cannot read {path}: {first_line(err)}") from None
    for module, kind in zip(modules, kinds):
        if kind not in APPLIED:
            raise InputError(f"{path} lists the sentence-transformers module {module['type']} "
                             f"({module.get('path') or 'the root'}), which gaprune does not apply: it embeds with "
                             f"{', '.join(APPLIED)} only, so its embeddings would differ from SentenceTransformer's")
    order = [APPLIED.index(kind) for kind in kinds]
    if order != sorted(order):
        raise InputError(f"{path} lists its modules as {' -> '.join(kinds)}; gaprune applies them in the order "
                         f"{' -> '.join(APPLIED)} only")
    return modules


def _activation(name: str, where: str) -> torch.nn.Module:
    """An instance of the torch.nn activation class ``name`` (a dotted path, as Dense's config.json gives it)."""
    module_name, _, class_name = name.rpartition(".")
    activation = None
    if name.startswith("torch."):
        try:
            activation = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            pass
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise InputError(f"{where}: activation_function {name!r} is not a torch.nn module class")
    return activation()


def _dense_weights(folder: str) -> dict[str, torch.Tensor]:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return load_file(os.path.join(folder, "model.safetensors"))
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise InputError(f"{folder} holds no model.safetensors or pytorch_model.bin for its Dense module")


def load_dense(model_dir: str, module: dict) -> DenseLayer:
    """The Dense module of a modules.json entry, with its weights, in float32 on the CPU."""
    folder = os.path.join(model_dir, module.get("path", ""))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the Dense module's config in {folder}: {first_line(err)}") from None
    inputs, outputs = config.get("module_input_name", EMBEDDING), config.get("module_output_name") or EMBEDDING
    if inputs != EMBEDDING or outputs != EMBEDDING:
        raise InputError(f"{folder}: a Dense module on {inputs!r} -> {outputs!r}; gaprune applies Dense to the "
                         f"{EMBEDDING} only")
    activation = _activation(config.get("activation_function", DEFAULT_ACTIVATION), folder)
    weights = _dense_weights(folder)
    try:
        layer = DenseLayer(config["in_features"], config["out_features"], config.get("bias", True), activation,
                           config.get("use_residual", False))
        layer.load_state_dict(weights)
    except (KeyError, TypeError, RuntimeError) as err:  # a missing field, or weights of other names or shapes
        raise InputError(f"cannot load the Dense module in {folder}: {first_line(err)}") from None
    return layer.float().eval()


def dense_layers(model_dir: str) -> list[DenseLayer]:
    """The folder's Dense modules in the order they apply, [] when it has none."""
    return [load_dense(model_dir, module) for module in read_modules(model_dir)
            if module["type"].rsplit(".", 1)[-1] == "Dense"]
