"""Chat batches grouped by length against chat batches at random: the share of real (unpadded) tokens over
many batches, and the time of a distillation step on chat batches (teacher forward + student forward/backward,
float32, the default recipe's distill settings), variants interleaved round by round. Needs the teacher's
chat answers cached (a default run or `distill_equal_minutes.py` makes them).

    PYTHONPATH=src .venv/bin/python benchmarks/chat_batch_padding.py runs/p60 --teacher runs/teacher

Appends rows to benchmarks/results/distill.json (benchmark 'chat_batch_padding').
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_equal_minutes import RESULTS, default_distill_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed chat steps per variant per round (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import minigiant
    from minigiant.distill import DistillConfig
    from minigiant.distill.batches import TrainingData
    from minigiant.distill.step import StepRunner
    from minigiant.hardware import describe_cpu

    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    student, _ = minigiant.load(args.student)
    student.train()
    for module in (student.get_input_embeddings(), student.get_output_embeddings()):
        module.requires_grad_(False)
    settings = default_distill_settings()
    variants = {"grouped by length": True, "at random": False}
    data, runner = {}, {}
    for name, grouped in variants.items():
        config = DistillConfig(**{**settings, "chat_fraction": 1.0, "chat_group_by_length": grouped})
        data[name], runner[name] = TrainingData(tokenizer, teacher, config, seed=0), StepRunner(student, teacher, config)

    rows, stamp, cpu = [], datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), describe_cpu()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in variants:
            first = round_ * (args.steps + 1)
            for index in range(first, first + args.steps + 1):
                batch = data[name].batch(index)
                start = time.perf_counter()
                runner[name](batch)
                if index > first:
                    times[name].append(time.perf_counter() - start)
                student.zero_grad(set_to_none=True)
    for name in variants:
        lengths = data[name].chat_lengths
        batches = [data[name].batch(i).valid for i in range(50 * len(lengths) // settings["batch_size"])]
        real = sum(int(v.sum()) for v in batches) / sum(v.numel() for v in batches)
        widths = [v.shape[1] for v in batches]
        rows.append({"benchmark": "chat_batch_padding", "time": stamp, "variant": name, "cpu": cpu, "student": args.student,
                     "chat_examples": len(lengths), "example_tokens_min_mean_max": [int(lengths.min()), round(float(lengths.float().mean()), 1), int(lengths.max())],
                     "real_token_share": round(real, 4), "mean_batch_width": round(statistics.mean(widths), 1),
                     "chat_step_wall_s_mean": round(statistics.mean(times[name]), 3), "chat_step_wall_s_median": round(statistics.median(times[name]), 3), "steps_timed": len(times[name]),
                     "command": "PYTHONPATH=src .venv/bin/python benchmarks/chat_batch_padding.py " + " ".join(sys.argv[1:])})
        print(json.dumps(rows[-1]))
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
