"""gaprune: Gradient-Alignment Pruning for domain-aware embedding models.

The stages as Python calls (see gaprune.api): load_embedder, sample, fisher, alignment, prune (a PruneSpec:
the whole request, checked when it is made; ScoreFiles: the scoring stages' JSON paths), evaluate,
save_model, retrain (a RetrainSpec), and DAIConfig for the scorer coefficients; InputError is what a bad
request raises. They are imported on first use, so that ``import gaprune.data`` stays light.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {"load_embedder": "gaprune.api", "fisher": "gaprune.api", "alignment": "gaprune.api",
            "prune": "gaprune.api", "evaluate": "gaprune.api", "save_model": "gaprune.checkpoint",
            "DAIConfig": "gaprune.coefficients", "PruneSpec": "gaprune.spec", "CalibrationSpec": "gaprune.spec",
            "ScoreFiles": "gaprune.spec", "InputError": "gaprune.errors", "sample": "gaprune.api",
            "retrain": "gaprune.api", "RetrainSpec": "gaprune.spec"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gaprune' has no attribute {name!r}")
