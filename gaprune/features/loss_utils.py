"""The published code's path for the loss; it lives in gaprune/loss.py."""

from gaprune.loss import SCALE, gather_across_processes, info_nce, triplet_loss

__all__ = ["SCALE", "gather_across_processes", "info_nce", "triplet_loss"]
