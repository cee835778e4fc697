"""Block-local healing: before global logit KD, each changed student layer is trained on its own to
reproduce the teacher's hidden state at the depth it stands for.

Every student layer ``j`` stands for teacher layer ``m(j)`` (``features.default_layer_map``: the kept layers
of a depth-pruned student, the same index for a width-pruned one). Its target is the teacher's output of
layer ``m(j)``; its input is either

- ``student``: the student's own stream, detached, so the layer learns to correct the error that the pruned
  layers before it left (what it meets at inference; the same idea as ``prune.sequential``), or
- ``teacher``: the teacher's output of layer ``m(j-1)`` (teacher forcing: every layer learns from clean
  inputs, independently of the others).

Because each layer's input is detached, the gradient of a layer's loss never leaves that layer: one
student forward and backward trains all layers at once, each on its own objective. No output head runs and no
vocabulary-sized softmax exists, which is where much of a KD step goes on a small model (the 49,152 × 576
head of the default teacher is ~30% of a 60% student's forward). The loss is the hidden-state loss of the
recipe (``hidden_loss``: relative squared error by default), averaged over the trained layers.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import ConfigError, TrainingError
from ..models.architecture import decoder_layers
from ..progress import progress
from .features import HIDDEN_LOSSES, OutputCapture, default_layer_map
from .forward import base_model
from .step import autocast

LOCAL_INPUTS = ("student", "teacher")


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class LocalHealer:
    """Hooks that make one student forward train every layer in ``trained`` towards its teacher layer.

    ``healer.layer_losses(ids, valid)`` runs the teacher and the student (no output heads) and returns the
    hidden-state loss of each trained layer; backward on their mean trains each layer locally."""

    def __init__(self, student, teacher, inputs: str = "student", hidden_loss: str = "mse", layer_map: list[int] | None = None, skip_layers: int = 0, bf16: bool = False):
        if inputs not in LOCAL_INPUTS:
            raise ConfigError(f"local_inputs must be one of {', '.join(LOCAL_INPUTS)}, got {inputs!r}")
        if student.config.hidden_size != teacher.config.hidden_size:
            raise ConfigError(f"block-local healing needs the teacher's hidden size ({teacher.config.hidden_size}), the student has {student.config.hidden_size}; set local_fraction: 0 and use hidden_weight (it learns a projection)")
        self.student, self.teacher, self.inputs, self.bf16 = student, teacher, inputs, bf16
        self.loss_fn = HIDDEN_LOSSES.get(hidden_loss)
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        self.layer_map = list(layer_map or default_layer_map(student, teacher))
        if len(self.layer_map) != len(s_layers) or sorted(set(self.layer_map)) != self.layer_map:
            raise ConfigError(f"block-local healing needs one increasing teacher layer per student layer, got {self.layer_map}")
        self.trained = list(range(skip_layers, len(s_layers)))
        # Outputs of the student's layers and of the teacher layers they stand for, by layer index.
        self.student_capture = OutputCapture(dict(enumerate(s_layers)))
        self.teacher_capture = OutputCapture({t: t_layers[t] for t in set(self.layer_map)})
        self.feeds = [layer.register_forward_pre_hook(self._feed(j), with_kwargs=True) for j, layer in enumerate(s_layers)]

    def _feed(self, j):
        def feed(module, args, kwargs):
            if j == 0:
                return None  # the embedding output, the same in both models
            hidden = self.teacher_capture.outputs[self.layer_map[j - 1]] if self.inputs == "teacher" else _hidden(args, kwargs)
            return _replace_hidden(args, kwargs, hidden.detach().to(_hidden(args, kwargs).dtype))

        return feed

    def layer_losses(self, ids: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            base_model(self.teacher)(input_ids=ids, use_cache=False)
        with autocast(self.bf16):
            base_model(self.student)(input_ids=ids, use_cache=False)
        student, teacher = self.student_capture.outputs, self.teacher_capture.outputs
        losses = [self.loss_fn(student[j][valid], teacher[self.layer_map[j]][valid]) for j in self.trained]
        student.clear()
        teacher.clear()
        return losses

    def remove(self):
        self.student_capture.remove()
        self.teacher_capture.remove()
        for h in self.feeds:
            h.remove()


def heal_blocks(student, teacher, data, config, params, steps: int, budget_s: float | None, skip_layers: int, bf16: bool, first_index: int) -> dict:
    """Train ``params`` of ``student`` block-locally for ``steps`` optimizer steps or ``budget_s`` seconds
    (whichever ends first) on ``data.batch(first_index + i)``; returns the phase's metrics."""
    from .trainer import lr_factor

    healer = LocalHealer(student, teacher, config.local_inputs, config.hidden_loss, config.hidden_layer_map, skip_layers, bf16)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(1, steps // 4))
    start = time.perf_counter()
    step = tokens = 0
    curve, per_layer = [], []
    total = steps
    student.train()
    try:
        with progress() as bar:
            task = bar.add_task("heal layers", total=total, info="")
            while step < total:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total, warmup)
                optimizer.zero_grad(set_to_none=True)
                value = 0.0
                for micro in range(config.grad_accum):
                    batch = data.batch(first_index + step * config.grad_accum + micro)
                    layers = healer.layer_losses(batch.ids, batch.valid)
                    loss = torch.stack(layers).mean()
                    (loss / config.grad_accum).backward()
                    per_layer = [l.item() for l in layers]
                    value += loss.item() / config.grad_accum
                    tokens += batch.tokens
                if not math.isfinite(value):
                    raise TrainingError(f"distill: block-local loss became {value} at step {step}; lower lr (now {config.lr}) or set local_fraction: 0")
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                curve.append([step, round(value, 5)])
                seconds = time.perf_counter() - start
                if budget_s is not None and step >= 3:
                    total = max(step, min(steps, int(budget_s / (seconds / step))))
                bar.update(task, completed=step, total=total, info=f"hidden loss {value:.4f}")
                if budget_s is not None and seconds >= budget_s:
                    break
    finally:
        healer.remove()
        student.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "inputs": config.local_inputs,
        "first_loss": curve[0][1] if curve else None,
        "final_loss": curve[-1][1] if curve else None,
        "layer_loss": [round(v, 5) for v in per_layer],  # the last step's loss of each trained layer
        "loss_curve": curve[:: max(1, len(curve) // 50)],
    }


__all__ = ["LOCAL_INPUTS", "LocalHealer", "heal_blocks"]
