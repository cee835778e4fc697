"""Prune: make the model smaller. Depth pruning (whole decoder layers) is the first method family;
width, unstructured and N:M pruning register beside it."""

from .depth import DEPTH_METHODS, PruneConfig, prune

__all__ = ["DEPTH_METHODS", "PruneConfig", "prune"]
