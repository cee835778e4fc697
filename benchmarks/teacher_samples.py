"""Free-running teacher samples as training text (the data-free generation of LLM-QAT, Liu et al. 2023): the
teacher starts from a document separator and samples, and the samples are written as one .txt file that
`minigiant distill --text FILE` trains on. Used to test whether the teacher's own distribution heals a pruned
student better than the shipped books (BENCHMARKS.md, "Distillation settings": it did not).

The samples are those of the text spec ``samples`` (``minigiant.data.samples.model_samples``: temperature 1,
top-p 0.95, 256 new tokens each, bf16 only where the CPU has it natively, cached), so this script and a recipe
that calibrates on ``samples`` read the same text.

    .venv/bin/python benchmarks/teacher_samples.py runs/teacher runs/teacher-samples/samples.txt --samples 192
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import minigiant
from minigiant.data.samples import SAMPLE_TOKENS, model_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("output", help=".txt file to write (samples separated by blank lines)")
    parser.add_argument("--samples", type=int, default=192, help=f"about this many samples of {SAMPLE_TOKENS} tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = minigiant.load(args.teacher)
    began = time.perf_counter()
    path = model_samples(model, tokenizer, args.samples * SAMPLE_TOKENS, args.seed)
    text = path.read_text(encoding="utf-8")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"wrote {args.output}: {tokens} tokens, {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
