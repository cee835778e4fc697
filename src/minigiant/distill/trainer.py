"""The distillation loop: teacher and student see the same packed blocks of text; the student learns from
the teacher's softened logits (``kd_weight``) and from the text itself (``ce_weight``).

It honours a time budget (the cosine schedule is stretched to the number of steps that fit), shows
progress with rate and ETA, checkpoints every few minutes and resumes from the last checkpoint, and stops on
a NaN/inf loss keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .. import artifact
from ..config import field
from ..context import Context
from ..data import sample_blocks
from ..errors import ConfigError, DataError, TrainingError
from ..progress import log, progress
from .losses import LOGIT_LOSSES


@dataclass
class DistillConfig:
    loss: str = field("kl", help="logit loss: kl (teacher‖student) | reverse_kl")
    temperature: float = field(1.0, help="softmax temperature applied to both teacher and student logits")
    kd_weight: float = field(1.0, help="weight of the distillation loss")
    ce_weight: float = field(0.1, help="weight of the next-token cross-entropy on the training text")
    text: str = field("corpus:train", help="training text spec: corpus[:train|heldout] or a .txt file/folder")
    block_size: int = field(256, help="tokens per training sequence")
    batch_size: int = field(4, help="sequences per optimizer step")
    lr: float = field(4e-4, help="peak learning rate (AdamW), warmup then cosine decay to 10%")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(10, help="linear warmup steps")
    max_steps: int = field(1000, help="upper bound on optimizer steps")
    minutes: Optional[float] = field(None, help="time budget in minutes (scaled by `run --minutes`); null: run max_steps")
    train_embeddings: bool = field(False, help="also train the (usually tied) embedding and output head")
    grad_clip: float = field(1.0, help="clip the gradient norm to this value (0: off)")
    checkpoint_minutes: float = field(2.0, help="save a resumable checkpoint this often")

    def validate(self, path: str) -> None:
        LOGIT_LOSSES.get(self.loss)
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature: must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ConfigError(f"{path}: kd_weight and ce_weight must be ≥ 0 and not both 0")
        for name in ("block_size", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be > 0, got {self.lr}")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"{path}.minutes: must be > 0 or null, got {self.minutes}")

    def fingerprint(self) -> str:
        """Identifies the training run for resuming; the time budget may change between attempts."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("minutes", "checkpoint_minutes", "max_steps")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))


class _Checkpoint:
    """``<work_dir>/checkpoint``: student weights (safetensors), optimizer state and step (weights-only torch file)."""

    def __init__(self, work_dir: Path | None, fingerprint: str):
        self.dir = Path(work_dir) / "checkpoint" if work_dir else None
        self.fingerprint = fingerprint

    def save(self, model, optimizer, state: dict) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_model

        with artifact.atomic_dir(self.dir) as tmp:
            save_model(model, str(tmp / "student.safetensors"))
            torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "fingerprint": self.fingerprint}))

    def load(self, model, optimizer) -> dict | None:
        if self.dir is None or not (self.dir / "state.json").is_file():
            return None
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            log(f"[yellow]distill: ignoring checkpoint in {self.dir} (made with other settings)")
            return None
        from safetensors.torch import load_model

        load_model(model, str(self.dir / "student.safetensors"))
        optimizer.load_state_dict(torch.load(self.dir / "optimizer.pt", weights_only=True)["optimizer"])
        return state


def _batches(blocks: torch.Tensor, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The batch for ``step``: epochs over the blocks, each in its own seeded order (so resume is exact)."""
    per_epoch = blocks.shape[0] // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return blocks[order[index * batch_size : (index + 1) * batch_size]]


def distill_loss(student_logits, teacher_logits, labels, config: DistillConfig) -> tuple[torch.Tensor, dict]:
    kd = LOGIT_LOSSES.get(config.loss)(student_logits, teacher_logits, config.temperature)
    loss = config.kd_weight * kd
    parts = {"kd": kd.item()}
    if config.ce_weight > 0:
        ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        loss = loss + config.ce_weight * ce
        parts["ce"] = ce.item()
    return loss, parts


def distill(model, config: DistillConfig = DistillConfig(), ctx: Context | None = None):
    """Train ``model`` (the student) against ``ctx.teacher`` in place; returns the model."""
    ctx = ctx or Context()
    config.validate("distill")
    tokenizer = ctx.require_tokenizer("distill")
    teacher = ctx.teacher
    if teacher is None:
        raise ConfigError("distill needs a teacher: pass Context(teacher=...) or --teacher MODEL")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"teacher and student vocabularies differ ({teacher.config.vocab_size} vs {model.config.vocab_size}); logit distillation needs the same tokenizer")
    torch.manual_seed(ctx.seed)
    blocks = sample_blocks(tokenizer, config.text, config.block_size, config.max_steps * config.batch_size, ctx.seed, what="training text")
    if blocks.shape[0] < config.batch_size:
        raise DataError(f"training text gives {blocks.shape[0]} block(s) of {config.block_size} tokens, fewer than one batch ({config.batch_size}); give more text or lower batch_size/block_size")

    frozen = []
    if not config.train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in module.parameters() if module is not None else []:
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    checkpoint = _Checkpoint(ctx.work_dir, config.fingerprint())
    state = checkpoint.load(model, optimizer) or {"step": 0, "total": config.max_steps, "losses": [], "seconds": 0.0}
    if state["step"]:
        log(f"distill: resuming from step {state['step']} ({checkpoint.dir})")

    budget_s = config.minutes * 60 * ctx.time_scale if config.minutes else None
    step, total = state["step"], state["total"]
    losses: list = state["losses"]
    elapsed_before = state["seconds"]
    saved_step = step  # the step of the checkpoint on disk (0: none yet)
    start = time.perf_counter()
    last_checkpoint = start
    stopped_by = "max_steps"
    teacher.eval()
    model.train()
    try:
        with progress() as bar:
            task = bar.add_task("distill", total=total, completed=step, info="")
            while step < total:
                batch = _batches(blocks, config.batch_size, step, ctx.seed)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total, config.warmup_steps)
                with torch.inference_mode():
                    teacher_logits = teacher(batch, use_cache=False).logits
                student_logits = model(batch, use_cache=False).logits
                loss, parts = distill_loss(student_logits, teacher_logits.clone(), batch, config)
                if not torch.isfinite(loss):
                    kept = f"the last good checkpoint (step {saved_step}) is in {checkpoint.dir}" if checkpoint.dir and saved_step else "no checkpoint was written yet"
                    raise TrainingError(f"distill: loss became {loss.item()} at step {step}; stopped, {kept}; lower lr (now {config.lr}) and rerun")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                losses.append([step, round(loss.item(), 5), {k: round(v, 5) for k, v in parts.items()}])

                now = time.perf_counter()
                seconds = elapsed_before + now - start
                if budget_s is not None and step >= 3:
                    # Fit the schedule to the time budget: as many steps as the measured pace allows.
                    total = max(step, min(config.max_steps, int(budget_s / (seconds / step))))
                tokens_per_s = step * batch.numel() / max(seconds, 1e-9)
                bar.update(task, completed=step, total=total, info=f"loss {loss.item():.3f}  {tokens_per_s:,.0f} tok/s")
                state = {"step": step, "total": total, "losses": losses, "seconds": seconds}
                if now - last_checkpoint > config.checkpoint_minutes * 60 and step < total:
                    checkpoint.save(model, optimizer, state)
                    last_checkpoint, saved_step = now, step
                if budget_s is not None and seconds >= budget_s and step < total:
                    stopped_by = "time"
                    break
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)

    seconds = elapsed_before + time.perf_counter() - start
    tail = [l for _, l, _ in losses[-10:]]
    artifact.record_stage(
        model,
        "distill",
        settings=dataclasses.asdict(config),
        metrics={
            "steps": step,
            "tokens": step * config.batch_size * config.block_size,
            "seconds": round(seconds, 1),
            "stopped_by": stopped_by,
            "first_loss": losses[0][1] if losses else None,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "loss_curve": [[s, l] for s, l, _ in losses[:: max(1, len(losses) // 50)]],
        },
    )
    return model
