"""gaprune: Gradient-Alignment Pruning for domain-aware embedding models.

The stages as Python calls (see gaprune.api): load_embedder, fisher, alignment, prune, evaluate.
"""

from gaprune.api import alignment, evaluate, fisher, load_embedder, prune
from gaprune.checkpoint import save_model
from gaprune.scoring import DAIConfig

__version__ = "0.1.0"
__all__ = ["load_embedder", "fisher", "alignment", "prune", "evaluate", "save_model", "DAIConfig"]
