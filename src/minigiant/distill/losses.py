"""Logit distillation losses. Each takes student and teacher logits ``[N, vocab]`` (one row per predicted
position) and a temperature, and returns the loss of every row ``[N]``, scaled by T² so gradients keep their
size as T changes (Hinton et al. 2015). Callers sum rows and divide by the number of positions, which lets the
trainer compute the loss a chunk of positions at a time (see ``chunked.py``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Registry

LOGIT_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = Registry("distillation loss")


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return s, t


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of every row, from log-probabilities (finite: they come from log_softmax of finite logits)."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


@LOGIT_LOSSES.register("kl")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student): mass-covering, the classic KD objective."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl_rows(t, s) * temperature**2


@LOGIT_LOSSES.register("reverse_kl")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(student ‖ teacher): mode-seeking (MiniLLM), favours the teacher's most likely tokens."""
    s, t = _log_probs(student, teacher, temperature)
    return _kl_rows(s, t) * temperature**2


@LOGIT_LOSSES.register("symmetric_kl")
def symmetric_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean of forward and reverse KL (torchtune's symmetric KD loss)."""
    s, t = _log_probs(student, teacher, temperature)
    return 0.5 * (_kl_rows(t, s) + _kl_rows(s, t)) * temperature**2
