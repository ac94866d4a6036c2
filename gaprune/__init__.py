"""gaprune: Gradient-Alignment Pruning for domain-aware embedding models."""

__version__ = "0.1.0"
