"""The optimizer distillation steps with: AdamW, or Muon for the weight matrices.

Why Muon is offered: it orthogonalises each matrix's momentum (Newton–Schulz), so every direction of a
matrix moves at the same rate, which was reported to need fewer tokens than AdamW when training language
models (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable"). A CPU run of distillation sees ~100k
tokens, so tokens are what it lacks. Muon is defined for matrices only: norms, biases and anything not 2-D
stay with AdamW. ``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's RMS, so the recipe's
``lr`` means the same for both (Moonshot's recipe).
"""

from __future__ import annotations

import torch


class MuonAdamW:
    """Muon for the 2-D parameters, AdamW for the rest, stepped as one optimizer (the trainer's schedule
    sets ``lr`` on every group; the checkpoint saves both states)."""

    def __init__(self, params, lr: float, weight_decay: float):
        matrices = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        self.optimizers = [torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")] if matrices else []
        if rest:
            self.optimizers.append(torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay))

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def make_optimizer(params: list, name: str, lr: float, weight_decay: float):
    """``name``: "adamw" or "muon" (Muon for matrices, AdamW for the rest)."""
    if name == "muon":
        return MuonAdamW(params, lr, weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
