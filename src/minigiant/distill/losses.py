"""Logit distillation losses. Each takes student and teacher logits ``[..., vocab]`` and a temperature and
returns the mean per-token loss, scaled by T² so gradients keep their size as T changes (Hinton et al. 2015)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Registry

LOGIT_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = Registry("distillation loss")


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    return s, t


@LOGIT_LOSSES.register("kl")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student): mass-covering, the classic KD objective."""
    s, t = _log_probs(student, teacher, temperature)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@LOGIT_LOSSES.register("reverse_kl")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(student ‖ teacher): mode-seeking (MiniLLM), favours the teacher's most likely tokens."""
    s, t = _log_probs(student, teacher, temperature)
    return F.kl_div(t, s, log_target=True, reduction="batchmean") * temperature**2
