"""The teacher writes encyclopedia articles as training text: for each topic of a list it answers "Write an
encyclopedia article about TOPIC." in its chat template, and the answers (without the template) are written as
one .txt file that `minigiant distill --text FILE` trains on. Tests whether expository text the teacher writes
heals a pruned student's WikiText-2 perplexity better than the shipped 19th-century books
(BENCHMARKS.md, "Distillation settings", 2026-12-06: mixed with the books, 2.7% at most, for generation that costs
most of a default run's training time). The free-running samples of benchmarks/teacher_samples.py did not:
they are loose text, where a prompt steers the teacher towards the encyclopedic prose WikiText-2 is made of.

    .venv/bin/python benchmarks/teacher_articles.py runs/dr/00-teacher runs/articles/articles.txt --new-tokens 160
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import minigiant
from minigiant.distill.chat import stop_ids
from minigiant.generate import pad_id, prompt_ids, sample_continuations
from minigiant.hardware import native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("output", help=".txt file to write (articles separated by blank lines)")
    parser.add_argument("--topics", default=str(Path(__file__).with_name("encyclopedia_topics.txt")), help="one topic per line")
    parser.add_argument("--per-topic", type=int, default=1, help="articles per topic (each with its own seed)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--no-repeat-ngram", type=int, default=6, help="an article never repeats one of its own n-grams of tokens (0: off)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = minigiant.load(args.teacher)
    if native_bf16():
        model = model.to(torch.bfloat16)  # generation only; ~2× faster where bf16 is native, far slower where emulated
    model.eval()
    topics = [line.strip() for line in Path(args.topics).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [prompt_ids(tokenizer, f"Write an encyclopedia article about {topic}.")[0].tolist() for topic in topics] * args.per_topic
    texts, tokens, began = [], 0, time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = sample_continuations(model, prompts[first : first + args.batch_size], pad_id(tokenizer), stop_ids(model, tokenizer), args.new_tokens,
                                     args.temperature, seed=first, answer_no_repeat_ngram_size=args.no_repeat_ngram)
        for ids, _ in batch:
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text:
                texts.append(text)
                tokens += len(ids)
        print(f"{len(texts)}/{len(prompts)} articles, {tokens} tokens, {time.perf_counter() - began:.0f} s", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(texts)} articles, {tokens} tokens, {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
