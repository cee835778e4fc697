import copy

import pytest
import torch

from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.distill import DistillConfig, LOGIT_LOSSES, distill
from minigiant.distill.trainer import lr_factor
from minigiant.errors import DataError, TrainingError

FAST = dict(block_size=32, batch_size=4, lr=3e-3, warmup_steps=2)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    for name in ("kl", "reverse_kl"):
        loss = LOGIT_LOSSES.get(name)
        assert loss(logits, logits, 2.0).abs() < 1e-6
        assert loss(logits, logits + torch.randn_like(logits), 2.0) > 0.01


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) > lr_factor(50, 100, 10) > lr_factor(90, 100, 10)


def test_kd_loss_decreases_and_student_moves_toward_teacher(tokenizer):
    teacher = make_model(len(tokenizer), layers=4, seed=1)
    student = make_model(len(tokenizer), layers=2, seed=2)
    ctx = Context(tokenizer=tokenizer, teacher=teacher)
    distill(student, DistillConfig(max_steps=40, ce_weight=0.0, **FAST), ctx)
    metrics = artifact.lineage(student)["stages"][-1]["metrics"]
    assert metrics["steps"] == 40 and metrics["tokens"] == 40 * 4 * 32
    assert metrics["final_loss"] < 0.7 * metrics["first_loss"]
    assert not any(p.requires_grad is False for p in student.parameters())  # frozen embeddings are restored


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=3, seed=1)
    config = DistillConfig(max_steps=6, checkpoint_minutes=0.0, **FAST)
    straight = make_model(len(tokenizer), layers=2, seed=2)
    distill(straight, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path / "a"))

    # Interrupt a second run after 3 steps by making the teacher fail, then resume.
    resumed = make_model(len(tokenizer), layers=2, seed=2)
    calls = {"n": 0}

    def fail_after_three(module, args, output):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt

    hook = teacher.register_forward_hook(fail_after_three)
    work = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(resumed), config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    hook.remove()
    assert (work / "checkpoint" / "state.json").is_file()
    distill(resumed, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=work))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer):
    teacher = make_model(len(tokenizer), layers=2, seed=1)
    calls = {"n": 0}

    def nan_after_four(module, args, output):
        calls["n"] += 1
        if calls["n"] > 4:
            output.logits.fill_(float("nan"))
        return output

    teacher.register_forward_hook(nan_after_four)
    student = make_model(len(tokenizer), layers=2, seed=2)
    config = DistillConfig(max_steps=10, checkpoint_minutes=0.0, **FAST)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; stopped, the last good checkpoint \(step 4\)"):
        distill(student, config, Context(tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path))
    assert (tmp_path / "checkpoint" / "student.safetensors").is_file()


def test_too_short_training_text_fails(tmp_path, tokenizer):
    text = tmp_path / "short.txt"
    text.write_text("Just a few words.")
    ctx = Context(tokenizer=tokenizer, teacher=make_model(len(tokenizer), layers=2))
    with pytest.raises(DataError, match="too short"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(text=str(text), **FAST), ctx)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text found"):
        distill(make_model(len(tokenizer), layers=2), DistillConfig(text=str(empty), **FAST), ctx)
