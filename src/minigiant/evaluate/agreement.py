"""How closely a student follows its teacher on held-out text: the share of positions where both predict the
same next token (top-1 agreement) and the mean KL(teacher ‖ student) of their next-token distributions.

Perplexity says how well a model predicts the text; these say how much of the teacher's behaviour the
student kept, which is what distillation optimises and what a user replacing the teacher cares about.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .perplexity import count_windows


@torch.inference_mode()
def teacher_agreement(student, teacher, ids: torch.Tensor, window: int = 1024, max_windows: int | None = 4) -> dict:
    """``{"top1_agreement", "kl_teacher_student", "tokens"}`` over non-overlapping windows of the 1-D ids
    ``ids`` (the perplexity windows: same positions, same context). KL is in nats per position."""
    windows = count_windows(ids.numel(), window, max_windows)
    agree, kl_sum, positions = 0, 0.0, 0
    for i in range(windows):
        chunk = ids[i * window : (i + 1) * window].unsqueeze(0)
        t_logits = teacher(input_ids=chunk.to(teacher.device), use_cache=False).logits[0].float()
        s_logits = student(input_ids=chunk.to(student.device), use_cache=False).logits[0].float().to(t_logits.device)
        if t_logits.shape != s_logits.shape:
            raise ValueError(f"teacher and student disagree on the vocabulary ({t_logits.shape[-1]} vs {s_logits.shape[-1]} logits)")
        t_logp = F.log_softmax(t_logits, dim=-1)
        s_logp = F.log_softmax(s_logits, dim=-1)
        agree += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().item()
        kl_sum += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()  # Σ p_t (log p_t − log p_s)
        positions += chunk.shape[1]
    return {"top1_agreement": agree / positions, "kl_teacher_student": kl_sum / positions, "agreement_tokens": positions}
