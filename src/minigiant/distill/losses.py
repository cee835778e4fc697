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


def logit_loss_and_grad(loss: str, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, temperature: float,
                        kd_weight: float, ce_weight: float) -> tuple[float, float, torch.Tensor]:
    """``(kd sum, ce sum, gradient)``: the summed rows of the logit loss ``loss`` and of the cross-entropy on
    ``labels``, and the gradient of ``kd_weight × kd + ce_weight × ce`` with respect to the student logits
    ``[N, vocab]`` (float32). ``teacher`` may be None when ``kd_weight`` is 0.

    Forward KL, the default, is computed in closed form: with ``log p = s/T - lse(s/T)`` and ``log q = t/T -
    lse(t/T)``, ``KL(q‖p) = Σ q log q - Σ q log p`` and its gradient is ``T (p - q)``; the cross-entropy's is
    ``softmax(s) - onehot``, which at T = 1 is the same ``p``. That is a handful of passes over the
    ``[N, vocab]`` logits where autograd through log-softmax, kl_div and cross-entropy made about twenty: on a
    2-core CPU the loss was a fifth of a training step (BENCHMARKS.md). Other losses go through autograd."""
    s = student.detach().float()
    if loss != "kl":
        leaf = s.requires_grad_(True)  # a detached tensor: a leaf of its own, apart from the head's graph
        with torch.enable_grad():
            kd = LOGIT_LOSSES.get(loss)(leaf, teacher, temperature).sum() if kd_weight > 0 else torch.zeros(())
            ce = F.cross_entropy(leaf, labels, reduction="sum") if ce_weight > 0 else torch.zeros(())
            (kd_weight * kd + ce_weight * ce).backward()
        return kd.item(), ce.item(), leaf.grad
    rows = torch.arange(s.shape[0])
    scaled = s if temperature == 1.0 else s / temperature
    p, lse = _softmax_and_lse(scaled)
    ce = 0.0
    if ce_weight > 0:  # -log softmax(s)[label] = lse(s) - s[label]
        ce = ((lse if temperature == 1.0 else torch.logsumexp(s, -1)) - s[rows, labels]).sum().item()
    # d(T² KL)/ds = T (p - q); d ce/ds = softmax(s) - onehot, and softmax(s) = p at T = 1
    grad = p.mul_(kd_weight * temperature + (ce_weight if temperature == 1.0 else 0.0))
    kd = 0.0
    if kd_weight > 0:
        t = teacher.float() if temperature == 1.0 else teacher.float() / temperature
        q, lse_t = _softmax_and_lse(t)
        # KL(q‖p) = Σ q (log q - log p) = Σ q t/T - lse(t/T) - Σ q s/T + lse(s/T), as Σ q = 1
        kd = (_rowdot(q, t) - lse_t - _rowdot(q, scaled) + lse).sum().item() * temperature**2
        grad.sub_(q, alpha=kd_weight * temperature)
    if ce_weight > 0:
        if temperature != 1.0:
            grad.add_(torch.softmax(s, -1), alpha=ce_weight)
        grad[rows, labels] -= ce_weight
    return kd, ce, grad


def unlikelihood_and_grad(student: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(sum, gradient)`` of the unlikelihood loss ``-log(1 - p(token))`` of each row of student logits
    ``[N, vocab]`` (Welleck et al. 2020, sequence level): it pushes down the probability of ``tokens``, the
    ones that repeat an n-gram the student already wrote. With ``p = softmax(s)`` and ``c`` the token,
    ``d/ds_j = p_c / (1 - p_c) · (onehot_c - p)_j``: only the token's own logit goes down, the rest rise as
    softmax redistributes."""
    p = torch.softmax(student.detach().float(), -1)
    rows = torch.arange(p.shape[0])
    p_c = p[rows, tokens].clamp(max=1 - 1e-6)  # a sure token would make the loss infinite
    ratio = p_c / (1 - p_c)
    grad = p.mul_(-ratio.unsqueeze(1))
    grad[rows, tokens] += ratio
    return -torch.log1p(-p_c).sum().item(), grad


def _softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) and logsumexp(x) over the last dim from one fused softmax: at the row's maximum m,
    softmax = exp(m - lse) ≥ 1/vocab, so lse = m - log softmax[argmax] loses no precision."""
    top, where = x.max(-1)
    p = torch.softmax(x, -1)
    return p, top - torch.log(p.gather(-1, where.unsqueeze(-1)).squeeze(-1))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a[i, j] b[i, j] per row, as a batched matrix product (no [N, vocab] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)
