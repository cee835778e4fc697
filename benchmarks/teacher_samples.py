"""Free-running teacher samples as training text (the data-free generation of LLM-QAT, Liu et al. 2023): the
teacher starts from a document separator and samples, and the samples are written as one .txt file that
`minigiant distill --text FILE` trains on. Used to test whether the teacher's own distribution heals a pruned
student better than the shipped books (BENCHMARKS.md, "Distillation settings": it did not).

    .venv/bin/python benchmarks/teacher_samples.py runs/teacher runs/teacher-samples/samples.txt --samples 192
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import minigiant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("output", help=".txt file to write (samples separated by blank lines)")
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--start-token", default="<|endoftext|>", help="the token every sample starts from")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = minigiant.load(args.teacher)
    model = model.to(torch.bfloat16).eval()  # generation only; bf16 is ~2× faster where it is native
    start = tokenizer.convert_tokens_to_ids(args.start_token)
    texts, began = [], time.perf_counter()
    for first in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - first)
        ids = torch.full((n, 1), start)
        torch.manual_seed(first)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 top_k=0, max_new_tokens=args.new_tokens, pad_token_id=tokenizer.eos_token_id)
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, 1:]]
        print(f"{len(texts)}/{args.samples} samples, {time.perf_counter() - began:.0f} s", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    tokens = len(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    print(f"wrote {args.output}: {len(texts)} samples, {tokens} tokens, {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
