"""Keeping a sparse student sparse while it heals.

Unstructured and N:M pruning (``prune/sparsity.py``) leave most of a weight matrix dense but with zeros at
chosen places. Plain training would fill those zeros again within a step, so the distilled model would lose
the sparsity that its storage (bitmask + values) and any sparse kernel rely on. As in SparseGPT's and Wanda's
fine-tuning experiments, the mask is held fixed: every gradient is multiplied by its weight's nonzero mask
(a tensor hook, so the global phase, block-local healing and multi-process averaging all see masked
gradients). AdamW then never moves a zero: its moments stay zero there, and decoupled weight decay scales
zero to zero. The mask is the zero pattern of the weights when distillation starts.
"""

from __future__ import annotations

import torch

from .. import artifact
from ..models.architecture import decoder_layers


def pruned_unstructured(model) -> bool:
    """Whether the model's lineage has an unstructured or N:M prune stage."""
    stages = artifact.lineage(model)["stages"]
    return any(s.get("stage") == "prune" and (s.get("settings") or {}).get("structure") == "unstructured" for s in stages)


class SparsityMasks:
    """The zero patterns of the decoder's weight matrices that have zeros; ``attach`` masks their gradients
    until ``detach``."""

    def __init__(self, model):
        self.masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for layer in decoder_layers(model):
            for p in layer.parameters():
                if p.requires_grad and p.dim() == 2:
                    mask = p.detach() != 0
                    if not bool(mask.all()):
                        self.masks.append((p, mask))
        total = sum(m.numel() for _, m in self.masks)
        self.zero_fraction_start = 1 - sum(int(m.sum()) for _, m in self.masks) / max(total, 1)
        self._handles: list = []

    def attach(self) -> None:
        self._handles = [p.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype)) for p, mask in self.masks]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def metrics(self) -> dict:
        """The masked matrices and their share of zeros at the start and now (equal while the masks hold)."""
        total = sum(m.numel() for _, m in self.masks)
        zeros_now = sum(int((p.detach() == 0).sum()) for p, _ in self.masks) / max(total, 1)
        return {"masked_matrices": len(self.masks), "masked_zero_fraction_start": round(self.zero_fraction_start, 5), "masked_zero_fraction_end": round(zeros_now, 5)}
