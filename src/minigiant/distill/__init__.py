"""Distill: train a student to match its teacher (response-based KD on temperature-softened logits plus
cross-entropy on the text). Feature, relation and sequence-level losses register beside these."""

from .losses import LOGIT_LOSSES
from .trainer import DistillConfig, distill

__all__ = ["DistillConfig", "LOGIT_LOSSES", "distill"]
