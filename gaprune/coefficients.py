"""The scorers' coefficients (DAIConfig): the defaults of their flags and the values every scorer reads.
Torch-free, so the command-line parsers can show the defaults without loading torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from gaprune.errors import InputError
from gaprune.options import FISHER_NORMS, POSTPROCESSING


@dataclass
class DAIConfig:
    """The coefficients of every scorer; the CLI flags take their defaults from here."""

    beta: float = 1.0  # weight of the general Fisher term (dai, dai_paper)
    compression_weight: float = 0.5  # weight of the sqrt|W| term (dai, dai_paper)
    score_postproc: str = "none"  # dai: per-tensor normalisation
    score_temperature: float = 1.0  # dai: zscore_sigmoid temperature
    fusion_alpha: float = 0.0  # dai: weight of an added Fd |W| term
    fusion_beta: float = 1.0  # dai: weight of the DAI score in that fusion
    alignment_weight: float = 0.5  # alpha in (1 + alpha s) (dai_paper, aligned_saliency)
    domain_weight: float = 1.0  # lambda_d (aligned_saliency)
    general_weight: float = 1.0  # lambda_g (aligned_saliency)
    fisher_norm: str = "global"  # F^ = F / mean F over all candidates, per tensor, or raw F

    def check(self) -> None:
        """Every coefficient is a finite number and every mode a known one."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{item.name} must be a finite number, got {value}")
        if self.score_postproc not in POSTPROCESSING:
            raise InputError(f"score_postproc must be one of {', '.join(POSTPROCESSING)}, got {self.score_postproc!r}")
        if self.fisher_norm not in FISHER_NORMS:
            raise InputError(f"fisher_norm must be one of {', '.join(FISHER_NORMS)}, got {self.fisher_norm!r}")

    @property
    def fuses(self) -> bool:
        return self.fusion_alpha != 0 or self.fusion_beta != 1
