"""Prune: make the model smaller. Depth pruning (whole decoder layers), width pruning (MLP neurons, attention
heads, with reconstruction), both at once, and unstructured / N:M sparsity, behind one verb and config."""

from .config import PruneConfig
from .depth import DEPTH_METHODS
from .importance import IMPORTANCE
from .reconstruct import RECONSTRUCT
from .sparsity import SPARSITY_METHODS
from .verb import prune

__all__ = ["DEPTH_METHODS", "IMPORTANCE", "RECONSTRUCT", "SPARSITY_METHODS", "PruneConfig", "prune"]
