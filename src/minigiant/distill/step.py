"""One forward/backward of distillation on a batch, built to spend the CPU on matrix products:

- the teacher runs without autograd, in bfloat16 when the precision resolves to bf16 (a bf16 copy of its
  weights; CPUs with AMX-BF16 or AVX512-BF16 multiply about 5× faster than in float32, CPUs without them
  emulate bf16 and are far slower, so ``auto`` picks float32 there: ``hardware.py``);
- the student's forward and backward run under bfloat16 autocast when its precision resolves to bf16
  (float32 master weights and optimizer state);
- the logit loss is computed ``logit_chunk`` positions at a time from the final hidden states: each chunk
  applies both output heads, its KL and cross-entropy with their gradient in closed form
  (``losses.logit_loss_and_grad``), and back-propagates into the student's final hidden state, so the full
  ``[batch, block, vocab]`` logits (200 MB in float32 for 4 × 256 × 49,152) never exist;
  one backward through the stack follows;
- layers the student shares unchanged with the teacher run once (``forward.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..hardware import resolve_precision
from .forward import final_hidden, prefix_hidden
from .losses import logit_loss_and_grad, unlikelihood_and_grad


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] token ids (right-padded)
    mask: torch.Tensor  # [B, T] bool: position i is trained to predict ids[:, i + 1]
    valid: torch.Tensor  # [B, T] bool: real (non-padding) tokens
    kind: str = "text"
    blocks: torch.Tensor | None = None  # text batches: indices of their blocks in the training set (for the logit cache)
    repeats: torch.Tensor | None = None  # on-policy batches: [B, T] bool, position i predicts a token of a repeated n-gram (unlikelihood)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


def text_batch(ids: torch.Tensor, blocks: torch.Tensor | None = None) -> Batch:
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    return Batch(ids, mask, torch.ones_like(ids, dtype=torch.bool), "text", blocks)


def _softcap(logits: torch.Tensor, config) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class StepRunner:
    """``runner(batch, scale)`` runs teacher and student on ``batch``, back-propagates ``scale`` × loss into
    the student and returns the loss parts (floats, per trained position)."""

    def __init__(self, student, teacher, config, features=None, prefix_layers: int = 0, cache=None):
        self.student, self.teacher, self.config, self.cache = student, teacher, config, cache
        self.features, self.prefix_layers = features, prefix_layers
        self.bf16 = resolve_precision(config.student_precision) == "bf16"

    def __call__(self, batch: Batch, scale: float = 1.0) -> dict:
        config, student, teacher = self.config, self.student, self.teacher
        ids = batch.ids
        cached = self.cache is not None and batch.blocks is not None and config.kd_weight > 0
        with torch.no_grad():
            prefix = prefix_hidden(teacher, ids, self.prefix_layers) if self.prefix_layers else None
            teacher_hidden = None
            if (config.kd_weight > 0 and not (cached and self.cache.has(batch.blocks))) or self.features:
                teacher_hidden = final_hidden(teacher, ids, prefix, self.prefix_layers)
            if cached and not self.cache.has(batch.blocks):
                self.cache.store(batch.blocks, _softcap(teacher.get_output_embeddings()(teacher_hidden), teacher.config))
        with autocast(self.bf16):
            student_prefix = prefix.float() if prefix is not None else None
            hidden = final_hidden(student, ids, student_prefix, self.prefix_layers)

        rows = batch.mask.reshape(-1).nonzero().squeeze(1)
        n = max(1, rows.numel())
        labels = ids.roll(-1, dims=1).reshape(-1)[rows]
        leaf = hidden.detach().requires_grad_(True)
        flat = leaf.reshape(-1, leaf.shape[-1])
        teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
        head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        chunk = config.logit_chunk if config.logit_chunk > 0 else max(1, rows.numel())
        # No cross-entropy on the student's own samples: it would teach the student to imitate itself, errors included.
        ce_weight = 0.0 if batch.kind == "on_policy" else config.ce_weight
        repeats = batch.repeats.reshape(-1)[rows] if batch.repeats is not None and config.unlikelihood_weight > 0 else None
        kd_sum = ce_sum = ul_sum = 0.0
        for start in range(0, rows.numel(), chunk):
            part = rows[start : start + chunk]
            with autocast(self.bf16):
                logits = _softcap(head(flat[part]), student.config)
            teacher_logits = None
            if config.kd_weight > 0:
                with torch.no_grad():
                    if cached:  # the teacher's distribution rebuilt from its top-k (see logit_cache.py)
                        teacher_logits = self.cache.dense(batch.blocks, part, ids.shape[1])
                    else:
                        teacher_logits = _softcap(teacher_head(teacher_flat[part]), teacher.config)
            kd, ce, grad = logit_loss_and_grad(config.loss, logits, teacher_logits, labels[start : start + chunk], config.temperature, config.kd_weight, ce_weight)
            kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
            if repeats is not None and repeats[start : start + chunk].any():
                hit = repeats[start : start + chunk].nonzero().squeeze(1)
                ul, ul_grad = unlikelihood_and_grad(logits[hit], labels[start : start + chunk][hit])
                grad[hit] += config.unlikelihood_weight * ul_grad
                ul_sum += ul
            logits.backward(grad.mul_(scale / n).to(logits.dtype))

        outputs, grads = [hidden], [leaf.grad if leaf.grad is not None else torch.zeros_like(hidden)]
        parts = {}
        if config.kd_weight > 0:
            parts["kd"] = kd_sum / n
        if ce_weight > 0:
            parts["ce"] = ce_sum / n
        if repeats is not None:
            parts["unlikelihood"] = ul_sum / n
        logit_total = config.kd_weight * parts.get("kd", 0.0) + ce_weight * parts.get("ce", 0.0) + config.unlikelihood_weight * parts.get("unlikelihood", 0.0)
        if self.features is not None:
            feature = self.features.loss(batch.valid)
            outputs.append(feature * scale)
            grads.append(None)
            parts["features"] = feature.item()
        torch.autograd.backward(outputs, grads)
        parts["loss"] = logit_total + parts.get("features", 0.0)
        return parts
