"""Feature- and relation-based distillation: the student's intermediate hidden states and attention
relations are pulled toward the teacher's, beside the logit loss.

- Hidden states (TextBrewer's intermediate matches): each student layer's output is compared with the
  teacher layer it stands for. A depth-pruned student maps layer j to the teacher layer it was copied from
  (``kept_layers`` in its lineage); otherwise layers are spread evenly (student layer j of S ↔ teacher layer
  round((j+1)·L/S) − 1). When widths differ, a learned linear projection (trained with the student, not
  saved with it) maps the student's width to the teacher's.
  ``mse`` is the squared error relative to the teacher's squared norm, Σ‖s−t‖² / Σ‖t‖², so layers with large
  activations do not dominate; ``cosine`` is the mean of 1 − cos(s, t) over positions.
- Attention relations (MiniLMv2): the queries, keys and values of the last layer are each split into
  ``relation_heads`` equal parts, their scaled dot-product relations (causal softmax over positions) are
  compared by KL(teacher ‖ student). The relation shape does not depend on the number of attention heads
  or the width, so students of any shape can match.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import artifact
from ..errors import ConfigError
from ..models.architecture import decoder_layers
from ..registry import Registry

HIDDEN_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("hidden-state loss")


@HIDDEN_LOSSES.register("mse")
def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ‖s − t‖² / Σ‖t‖² over the rows ``[N, width]``."""
    return (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp_min(1e-12)


@HIDDEN_LOSSES.register("cosine")
def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 − cos(s, t)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def attention_relation_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int, valid: torch.Tensor) -> torch.Tensor:
    """MiniLMv2 relation KL between ``[B, T, D_s]`` and ``[B, T, D_t]`` projections (queries, keys or values).

    Each is split into ``heads`` parts of width d; relation = softmax(x xᵀ / √d) over earlier valid positions;
    the result is KL(teacher ‖ student) averaged over heads and valid query positions."""

    def relations(x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        if width % heads:
            raise ConfigError(f"relation_heads={heads} does not divide the projection width {width}; choose a divisor of it")
        x = x.float().view(b, t, heads, width // heads).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() & valid[:, None, None, :]
        return F.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    s, t = relations(student), relations(teacher)
    p = t.exp()
    kl = torch.where(p == 0, torch.zeros_like(p), p * (t - s)).sum(-1)  # [B, heads, T]
    rows = valid[:, None, :].expand_as(kl)
    return kl[rows].mean()


def default_layer_map(student, teacher) -> list[int]:
    """For each student layer, the teacher layer it stands for (see module doc)."""
    s_layers, t_layers = len(decoder_layers(student)), len(decoder_layers(teacher))
    for stage in reversed(artifact.lineage(student)["stages"]):
        kept = stage.get("metrics", {}).get("kept_layers")
        if kept and len(kept) == s_layers and max(kept) < t_layers:
            return list(kept)
    return [max(0, round((j + 1) * t_layers / s_layers) - 1) for j in range(s_layers)]


class OutputCapture:
    """Forward hooks that keep the outputs of some modules for one step, under the keys of ``modules``."""

    def __init__(self, modules: dict):
        self.outputs: dict = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def keep(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return keep

    def remove(self):
        for h in self.handles:
            h.remove()


def _projections(layer) -> dict[str, nn.Module]:
    attn = getattr(layer, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj")
    if attn is None or not all(hasattr(attn, n) for n in names):
        raise ConfigError("attention-relation distillation needs q_proj/k_proj/v_proj modules (llama-style attention); set attention_weight: 0")
    return {n: getattr(attn, n) for n in names}


class FeatureMatcher(nn.Module):
    """Hooks on student and teacher; ``loss(valid)`` after both forwards gives the weighted feature loss."""

    def __init__(self, student, teacher, hidden_weight: float, hidden_loss: str, attention_weight: float, relation_heads: int,
                 layer_map: list[int] | None = None, skip_student_layers: int = 0):
        super().__init__()
        self.hidden_weight, self.attention_weight, self.relation_heads = hidden_weight, attention_weight, relation_heads
        self.hidden_loss = HIDDEN_LOSSES.get(hidden_loss)
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        layer_map = layer_map or default_layer_map(student, teacher)
        if len(layer_map) != len(s_layers) or not all(0 <= t < len(t_layers) for t in layer_map):
            raise ConfigError(f"hidden_layer_map must give one teacher layer (0..{len(t_layers) - 1}) for each of the student's {len(s_layers)} layers, got {layer_map}")
        # Layers the student shares frozen with the teacher (run once, see forward.py) need no matching.
        self.pairs = [(j, layer_map[j]) for j in range(skip_student_layers, len(s_layers))] if hidden_weight > 0 else []
        s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
        self.projections = nn.ModuleList(nn.Linear(s_width, t_width, bias=False) for _ in self.pairs) if s_width != t_width else None
        s_modules = {f"h{j}": s_layers[j] for j, _ in self.pairs}
        t_modules = {f"h{j}": t_layers[t] for j, t in self.pairs}
        if attention_weight > 0:
            s_modules.update(_projections(s_layers[-1]))
            t_modules.update(_projections(t_layers[-1]))
        self.student_capture, self.teacher_capture = OutputCapture(s_modules), OutputCapture(t_modules)

    def loss(self, valid: torch.Tensor) -> torch.Tensor:
        s, t = self.student_capture.outputs, self.teacher_capture.outputs
        total = torch.zeros(())
        if self.pairs:
            hidden = []
            for i, (j, _) in enumerate(self.pairs):
                student_rows = s[f"h{j}"][valid]
                if self.projections is not None:
                    student_rows = self.projections[i](student_rows.float())
                hidden.append(self.hidden_loss(student_rows, t[f"h{j}"][valid]))
            total = total + self.hidden_weight * torch.stack(hidden).mean()
        if self.attention_weight > 0:
            rel = [attention_relation_loss(s[n], t[n], self.relation_heads, valid) for n in ("q_proj", "k_proj", "v_proj")]
            total = total + self.attention_weight * torch.stack(rel).mean()
        s.clear()
        t.clear()
        return total

    def remove_hooks(self):
        self.student_capture.remove()
        self.teacher_capture.remove()
