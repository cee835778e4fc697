"""How closely a student follows its teacher on held-out text: the share of positions where both predict the
same next token (top-1 agreement) and the mean KL(teacher ‖ student) of their next-token distributions.

Perplexity says how well a model predicts the text; these say how much of the teacher's behaviour the
student kept, which is what distillation optimises and what a user replacing the teacher cares about.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..artifact import write_atomic
from .perplexity import count_windows


SHARED_LOGITS_BYTES = 2 * 2**30  # at most ~10 windows of 1024 positions × 49k vocabulary on disk at once


class Agreement:
    """Accumulates agreement window by window from logits the student already computed (the evaluation's
    perplexity pass scores the same windows, so the student runs once); the teacher runs on each window,
    unless it is the student itself.

    ``shared_logits``: a folder where the teacher's logits of window ``i`` are kept as ``window-i.safetensors``.
    When the teacher is evaluated first (a recipe's evaluate stage, where it is the reference) its own perplexity
    pass writes them there, and every student reads them instead of running the teacher again: the same
    float32 logits, so the same numbers, an eighth sooner for the default's 5 models on 2 cores (BENCHMARKS.md)."""

    def __init__(self, teacher, student=None, shared_logits: str | Path | None = None):
        self.teacher, self.is_student = teacher, teacher is student
        self.shared = Path(shared_logits) if shared_logits else None
        self.agree, self.kl_sum, self.positions = 0, 0.0, 0

    def _window_file(self, index: int | None) -> Path | None:
        return self.shared / f"window-{index}.safetensors" if self.shared is not None and index is not None else None

    def _teacher_logits(self, index: int | None, chunk: torch.Tensor) -> torch.Tensor:
        path = self._window_file(index)
        if path is not None and path.is_file():
            saved = load_file(path)
            if torch.equal(saved["ids"], chunk[0].cpu()):
                return saved["logits"].to(self.teacher.device)
        return self.teacher(input_ids=chunk.to(self.teacher.device), use_cache=False).logits[0].float()

    def _share(self, index: int | None, chunk: torch.Tensor, logits: torch.Tensor) -> None:
        path = self._window_file(index)
        if path is None or path.is_file():
            return
        if (index + 1) * logits.numel() * 4 > SHARED_LOGITS_BYTES:
            return  # the students run the teacher on the windows past the budget
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic, so a parallel reader never sees half a file.
        write_atomic(path, save({"ids": chunk[0].cpu().contiguous(), "logits": logits.cpu().contiguous()}))

    @torch.inference_mode()
    def add(self, chunk: torch.Tensor, student_logits: torch.Tensor, index: int | None = None) -> None:
        """``chunk``: [1, window] token ids; ``student_logits``: the student's [window, vocab] logits on it;
        ``index``: the window's place in the text (names its file in ``shared_logits``)."""
        s_logits = student_logits.float()
        if self.is_student:
            t_logits = s_logits
            self._share(index, chunk, s_logits)
        else:
            t_logits = self._teacher_logits(index, chunk)
            s_logits = s_logits.to(t_logits.device)
        if t_logits.shape != s_logits.shape:
            raise ValueError(f"teacher and student disagree on the vocabulary ({t_logits.shape[-1]} vs {s_logits.shape[-1]} logits)")
        t_logp = F.log_softmax(t_logits, dim=-1)
        s_logp = F.log_softmax(s_logits, dim=-1)
        self.agree += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().item()
        self.kl_sum += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()  # Σ p_t (log p_t − log p_s)
        self.positions += s_logits.shape[0]

    def result(self) -> dict:
        return {"top1_agreement": self.agree / self.positions, "kl_teacher_student": self.kl_sum / self.positions, "agreement_tokens": self.positions}


@torch.inference_mode()
def teacher_agreement(student, teacher, ids: torch.Tensor, window: int = 1024, max_windows: int | None = 4) -> dict:
    """``{"top1_agreement", "kl_teacher_student", "agreement_tokens"}`` over non-overlapping windows of the 1-D
    ids ``ids`` (the perplexity windows: same positions, same context). KL is in nats per position."""
    meter = Agreement(teacher, student)
    for i in range(count_windows(ids.numel(), window, max_windows)):
        chunk = ids[i * window : (i + 1) * window].unsqueeze(0)
        meter.add(chunk, student(input_ids=chunk.to(student.device), use_cache=False).logits[0])
    return meter.result()
