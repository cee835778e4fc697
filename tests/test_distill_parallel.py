"""Two CPU processes (torchrun, gloo) distil exactly like one process with twice the gradient accumulation."""

import json
import subprocess
import sys

import torch

import minigiant
from conftest import make_model
from minigiant import artifact
from minigiant.context import Context
from minigiant.distill import DistillConfig, distill

SCRIPT = """
import json, sys
import torch
import minigiant
from minigiant.context import Context
from minigiant.distill import DistillConfig, distill

torch.set_num_threads(1)
teacher, tokenizer = minigiant.load(sys.argv[1])
student, _ = minigiant.load(sys.argv[2])
distill(student, DistillConfig(**json.loads(sys.argv[3])), Context(tokenizer=tokenizer, teacher=teacher))
minigiant.artifact.save(student, tokenizer, sys.argv[4])  # process 0 writes, process 1 returns
"""

SETTINGS = dict(max_steps=4, block_size=32, batch_size=2, lr=1e-3, warmup_steps=1)


def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, tokenizer):
    teacher_dir = artifact.save(make_model(len(tokenizer), layers=3, seed=1), tokenizer, tmp_path / "teacher")
    student_dir = artifact.save(make_model(len(tokenizer), layers=2, seed=2), tokenizer, tmp_path / "student")
    script = tmp_path / "distill_worker.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(teacher_dir), str(student_dir), json.dumps({**SETTINGS, "grad_accum": 1}), str(tmp_path / "parallel")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parallel, _ = minigiant.load(tmp_path / "parallel")
    metrics = artifact.lineage(parallel)["stages"][-1]["metrics"]

    teacher, _ = minigiant.load(teacher_dir)
    single, _ = minigiant.load(student_dir)
    torch.set_num_threads(1)
    distill(single, DistillConfig(**SETTINGS, grad_accum=2), Context(tokenizer=tokenizer, teacher=teacher))
    expected = artifact.lineage(single)["stages"][-1]["metrics"]
    assert metrics["steps"] == expected["steps"] == 4
    assert metrics["tokens"] == expected["tokens"] == 4 * 2 * 2 * 32  # both processes' tokens counted
    for (step_a, loss_a), (step_b, loss_b) in zip(metrics["loss_curve"], expected["loss_curve"]):
        assert step_a == step_b and abs(loss_a - loss_b) < 1e-4
    for (name, a), b in zip(parallel.named_parameters(), single.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    moved = any(not torch.equal(a, b) for a, b in zip(single.parameters(), minigiant.load(student_dir)[0].parameters()))
    assert moved
