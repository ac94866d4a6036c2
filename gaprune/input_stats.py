"""A linear layer's calibration inputs, seen only through their statistics, per side and blended.

Per side ("domain", "general"): sum over tokens of x_j^2 (Wanda), of x x^T (SparseGPT's Hessian) and of
x_dense x^T (towards the dense model's outputs). Blended on request (cross-calibration):
(1 - g) * domain mean + g * general mean, per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from gaprune.errors import InputError
from gaprune.pruners import dense_target_weight


@dataclass
class InputStats:
    """One linear layer's inputs on one side: sum over tokens of x_j^2 and (optionally) of x x^T, and of
    x_dense x^T with the same token's input in the dense model (``cross``); each token counted once or by its
    weight."""

    input_sq: torch.Tensor
    hessian: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> None:
        x = x.float()
        dense = None if dense is None else dense.float()
        if weight is not None:  # each token's x x^T counted weight times
            scale = weight.to(x.device).sqrt().unsqueeze(1)
            x = x * scale
            dense = None if dense is None else dense * scale
        self.input_sq += x.square().sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        if self.cross is not None:
            self.cross.addmm_(dense.T, x)
        self.tokens += x.shape[0]


@dataclass
class LayerInputs:
    """A layer's input statistics on each side, blended: (1 - general_share) domain + general_share general."""

    sides: dict[str, InputStats] = field(default_factory=dict)
    general_share: float = 0.0

    def _blend(self, pick: Callable[[InputStats], torch.Tensor]) -> torch.Tensor:
        shares = {"domain": 1.0 - self.general_share, "general": self.general_share}
        present = {side: stats for side, stats in self.sides.items() if stats.tokens and shares[side]}
        if not present:
            raise InputError("no calibration tokens reached a candidate layer (empty calibration texts?)")
        total = sum(shares[side] for side in present)
        return sum(pick(stats) * (shares[side] / total / stats.tokens) for side, stats in present.items())

    @property
    def input_sq(self) -> torch.Tensor:
        return self._blend(lambda stats: stats.input_sq)

    @property
    def hessian(self) -> torch.Tensor:
        return self._blend(lambda stats: stats.hessian)

    @property
    def cross(self) -> torch.Tensor:
        """The blended sum of x_dense x^T (collected with the dense model's inputs)."""
        return self._blend(lambda stats: stats.cross)

    def start_weight(self, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """What the OBS update (SparseGPT, reconstruction) starts from, with ``hessian`` this layer's: the weight,
        or with the dense model's inputs collected W*, from which it reproduces the dense model's outputs."""
        if any(stats.cross is None for stats in self.sides.values()):
            return weight
        return dense_target_weight(weight, hessian, self.cross)
