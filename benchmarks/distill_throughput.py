"""Distillation tokens/s: each lever of the training step alone, and all together, against the loop of the
first release (teacher float32 logits, student float32 logits for the whole batch, one backward), measured in
one process with the variants interleaved round by round, so a machine shared with other jobs slows all of them
alike. Reports the median CPU time of the process per step (one thread; see the comment in main) per variant; one step = teacher forward + student forward/backward +
AdamW update on batch 4 × 256 tokens of the shipped books (``--batch-size``).

    PYTHONPATH=src python benchmarks/distill_throughput.py --student runs/baseline/01-prune --teacher runs/baseline/00-teacher

(the directories come from `minigiant run --output runs/baseline`). Appends rows to benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minigiant
from minigiant.data import sample_blocks
from minigiant.distill import DistillConfig
from minigiant.distill.forward import shared_prefix_layers
from minigiant.distill.losses import LOGIT_LOSSES, forward_kl
from minigiant.distill.step import StepRunner, text_batch
from minigiant.models.architecture import decoder_layers

RESULTS = Path(__file__).parent / "results" / "distill.json"
# Forward KL under another name: logit_loss_and_grad computes "kl" in closed form and any other loss by autograd.
AUTOGRAD_KL = "kl (autograd)"
LOGIT_LOSSES.register(AUTOGRAD_KL)(forward_kl)


def legacy_step(student, teacher, batch, optimizer, params):
    """The training step of the first release, verbatim in effect."""
    with torch.inference_mode():
        teacher_logits = teacher(batch, use_cache=False).logits
    student_logits = student(batch, use_cache=False).logits
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.clone().float().flatten(0, -2), dim=-1)
    loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
    loss = loss + 0.1 * F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


VARIANTS = {
    "today's loop (fp32, full logits)": None,
    "new step, all levers off": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=0, shared_prefix=False),
    "teacher bf16": dict(teacher_precision="bf16", student_precision="fp32", logit_chunk=0, shared_prefix=False),
    "student bf16 autocast": dict(teacher_precision="fp32", student_precision="bf16", logit_chunk=0, shared_prefix=False),
    "chunked logit loss (256 positions)": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=256, shared_prefix=False),
    "shared frozen prefix": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=0, shared_prefix=True),
    "all levers": dict(teacher_precision="bf16", student_precision="bf16", logit_chunk=256, shared_prefix=True),
    # what precision auto gives on a CPU without native bf16 (AVX2): every lever but bf16
    "all levers but float32": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=256, shared_prefix=True),
    # the same, with the logit loss's gradient by autograd as before 2026-12-05 (losses.logit_loss_and_grad)
    "all levers but float32, autograd loss": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=256, shared_prefix=True, loss=AUTOGRAD_KL),
    # the same with both decoder stacks under torch.compile (inductor's C++ backend; compile time is reported apart)
    "all levers but float32, torch.compile": dict(teacher_precision="fp32", student_precision="fp32", logit_chunk=256, shared_prefix=True, compile=True),
}
BASELINE = "today's loop (fp32, full logits)"


def make_variant(name, student0, teacher, teacher_bf16):
    student = copy.deepcopy(student0).train()
    settings = VARIANTS[name]
    prefix = shared_prefix_layers(student, teacher) if settings and settings["shared_prefix"] else 0
    frozen = [student.get_input_embeddings(), student.get_output_embeddings()] + [decoder_layers(student)[i] for i in range(prefix)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=4e-4, betas=(0.9, 0.95))
    if settings is None:
        return lambda batch: legacy_step(student, teacher, batch, optimizer, params)
    settings = dict(settings)
    compiled = settings.pop("compile", False)
    config = DistillConfig(**settings)
    run_teacher = teacher_bf16 if config.teacher_precision == "bf16" else teacher
    if compiled:
        # Compile copies, so the other variants keep running the plain teacher; the step calls the decoder
        # stacks (model.model), which Module.compile wraps in place.
        run_teacher = copy.deepcopy(run_teacher)
        for model in (student, run_teacher):
            model.model.compile()
    runner = StepRunner(student, run_teacher, config, None, prefix)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        parts = runner(text_batch(batch))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return parts["loss"]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="what the machine was doing (recorded with the rows)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset (the first-release loop is always run: it is the baseline)")
    args = parser.parse_args()
    variants = [BASELINE] + [v for v in (args.variants or VARIANTS) if v != BASELINE]
    bs = args.batch_size
    torch.set_num_threads(args.threads)
    student0, tokenizer = minigiant.load(args.student)
    teacher, _ = minigiant.load(args.teacher)
    teacher.eval()
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    blocks = sample_blocks(tokenizer, "corpus:train", 256, bs * (args.steps + 1), seed=0)
    batches = [blocks[i * bs : (i + 1) * bs] for i in range(args.steps + 1)]

    # How far the bf16 teacher's distribution is from the float32 one (per token, on the first batch).
    with torch.no_grad():
        t32 = F.log_softmax(teacher(batches[0], use_cache=False).logits.float(), -1)
        t16 = F.log_softmax(teacher_bf16(batches[0], use_cache=False).logits.float(), -1)
        kl_bf16 = (t32.exp() * (t32 - t16)).sum(-1).mean().item()
        top1 = (t32.argmax(-1) == t16.argmax(-1)).float().mean().item()
    print(f"bf16 teacher vs fp32: KL {kl_bf16:.5f} nats/token, top-1 agreement {top1:.4f}")

    # CPU time of this process is the measure: on a CPU shared with other jobs, wall time mostly measures the
    # other jobs, while one thread's CPU seconds measure the work a step costs (the issue asks tokens per CPU-minute).
    times: dict[str, list[float]] = {name: [] for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    first_loss: dict[str, float] = {}
    warmups: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name in variants:
            step = make_variant(name, student0, teacher, teacher_bf16)
            start = time.perf_counter()
            loss = step(batches[0])  # warm-up (allocations, oneDNN kernel selection, torch.compile's compilation)
            warmups.setdefault(name, []).append(time.perf_counter() - start)
            first_loss.setdefault(name, round(loss, 4))
            for batch in batches[1:]:
                start, cpu = time.perf_counter(), time.process_time()
                step(batch)
                times[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - start)
            del step
            print(f"round {round_ + 1}: {name}: {statistics.median(times[name][-args.steps:]):.2f} CPU s/step ({statistics.median(walls[name][-args.steps:]):.1f} s wall)", flush=True)

    base = statistics.median(times[BASELINE])
    from minigiant.hardware import describe_cpu

    host = describe_cpu()
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({
            "benchmark": "distill_throughput", "time": stamp, "variant": name, "settings": VARIANTS[name],
            "cpu_seconds_per_step": round(median, 3), "tokens_per_cpu_s": round(256 * bs / median, 1), "speedup": round(base / median, 2),
            "batch": f"{bs}x256", "cpu": host["cpu"], "isa": host["isa"], "native_bf16": host["native_bf16"],
            "wall_seconds_per_step": round(statistics.median(walls[name]), 3),
            "first_step_loss": first_loss[name], "steps_timed": len(ts), "threads": args.threads,
            "warmup_wall_seconds": round(statistics.median(warmups[name]), 1),
            "note": args.note,
        })
        print(f"| {name} | {median:.2f} | {256 * bs / median:.0f} | {base / median:.2f}x |")
    rows.append({"benchmark": "distill_throughput", "time": stamp, "variant": "bf16 teacher fidelity", "kl_fp32_to_bf16": round(kl_bf16, 5), "top1_agreement": round(top1, 4)})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
