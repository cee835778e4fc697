"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): on a share of the chat steps
(``on_policy_fraction``) the student answers the chat prompts itself, sampled from its current weights, and the
teacher's distribution over the student's own tokens is the target (loss on the answer tokens only, as for the
teacher's answers).

Why: on fixed text and on the teacher's answers the student only ever conditions on good prefixes; when it
generates, it conditions on its own, and the states its mistakes lead to (a loop it has started) are never in
its training data. Sampling puts them in the batch, and the teacher says what should come next there — the
exposure bias behind the repetition that training on fixed text leaves.

Why unlikelihood (``unlikelihood_weight``): shown a loop, the teacher often predicts its next turn too (a
repeated n-gram is easy to continue), so KD alone barely teaches the student to leave one; the tokens of a
repeated n-gram in the student's own answer get ``-log(1 - p)`` as well (Welleck et al. 2020, sequence level).

The sample of global batch ``index`` is drawn with a generator seeded by (seed, index) from the student's
weights at that step, so a run resumed from a checkpoint draws the same answers as one that never stopped.
"""

from __future__ import annotations

import time

import torch

from ..generate import pad_id, sample_continuations
from ..progress import log
from .chat import chat_batch, stop_ids
from .step import Batch, autocast


class OnPolicySampler:
    """``sampler(examples, index)``: the chat batch of the student's own answers to the prompts of ``examples``
    (``(ids, prompt_length)`` pairs; their answers are ignored). ``stats`` keeps what the samples looked like
    (saved in checkpoints and in the stage metrics)."""

    def __init__(self, student, tokenizer, config, seed: int, bf16: bool, stats: dict | None = None):
        self.student, self.tokenizer, self.config, self.seed, self.bf16 = student, tokenizer, config, seed, bf16
        self.pad = pad_id(tokenizer)
        self.stops = stop_ids(student, tokenizer)
        self.stats = stats or {"batches": 0, "answers": 0, "answer_tokens": 0, "finished": 0, "seconds": 0.0, "repeat4": []}

    def __call__(self, examples: list[tuple[list[int], int]], index: int) -> Batch:
        from ..evaluate.chat import repeated_ngram_rate

        prompts = [ids[:prompt_length] for ids, prompt_length in examples]
        started = time.perf_counter()
        was_training = self.student.training
        self.student.eval()
        try:
            with autocast(self.bf16):
                samples = sample_continuations(self.student, prompts, self.pad, self.stops, self.config.on_policy_max_new_tokens,
                                               self.config.on_policy_temperature, self.seed * 1_000_003 + 104_729 * (index + 1))
        finally:
            self.student.train(was_training)
        # An answer the student ended itself keeps its end-of-turn: whether stopping there was right is for the
        # teacher to say; one cut at max_new_tokens gets none. Prompts are shorter than block_size (chat_examples),
        # so every row keeps at least one answer position.
        rows = [((prompt + answer + ([stop] if stop is not None else []))[: self.config.block_size], len(prompt)) for prompt, (answer, stop) in zip(prompts, samples)]
        stats = self.stats
        stats["batches"] += 1
        stats["answers"] += len(samples)
        stats["answer_tokens"] += sum(len(a) for a, _ in samples)
        stats["finished"] += sum(stop is not None for _, stop in samples)
        stats["seconds"] = round(stats["seconds"] + time.perf_counter() - started, 3)
        rate = repeated_ngram_rate([self.tokenizer.decode(a, skip_special_tokens=True) for a, _ in samples], 4)
        stats["repeat4"].append(round(rate, 4) if rate is not None else None)
        batch = chat_batch(rows, self.pad)
        batch.kind = "on_policy"
        if self.config.unlikelihood_weight > 0:
            batch.repeats = torch.zeros_like(batch.mask)
            for i, (row, prompt_length) in enumerate(rows):
                for j, repeated in enumerate(repeated_ngram_tokens(row[prompt_length:], self.config.unlikelihood_ngram)):
                    batch.repeats[i, prompt_length + j - 1] = repeated  # position p predicts token p + 1
        return batch

    def metrics(self) -> dict:
        """What the student's samples looked like: how many, how long, how often it stopped by itself, the time
        spent sampling, and the repeated-4-gram rate of its first and last ten batches (falling = less looping)."""
        s = self.stats
        rates = [r for r in s["repeat4"] if r is not None]
        mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
        return {
            "batches": s["batches"], "answers": s["answers"], "seconds": s["seconds"],
            "mean_answer_tokens": round(s["answer_tokens"] / max(1, s["answers"]), 1),
            "finished_share": round(s["finished"] / max(1, s["answers"]), 3),
            "repeat4_first": mean(rates[:10]), "repeat4_last": mean(rates[-10:]),
        }


def repeated_ngram_tokens(tokens: list[int], n: int) -> list[bool]:
    """For each token, whether it belongs to an n-gram that already occurred earlier in ``tokens`` (the
    candidates of sequence-level unlikelihood). ``[1, 2, 1, 2, 1]`` with n = 2: the second ``1 2`` and the
    ``2 1`` after it repeat, so ``[F, F, T, T, T]``."""
    from ..evaluate.chat import completes_repeat

    flags = [False] * len(tokens)
    for last, completes in enumerate(completes_repeat(tokens, n)):
        if completes:  # the whole n-gram that ``last`` closes
            flags[last - n + 1 : last + 1] = [True] * n
    return flags


def log_summary(metrics: dict) -> None:
    log(f"distill: on-policy {metrics['batches']} batches, {metrics['mean_answer_tokens']} tokens per answer, "
        f"{metrics['finished_share']:.0%} ended by the student, {metrics['seconds']:.0f} s sampling; "
        f"repeated 4-grams {metrics['repeat4_first']} → {metrics['repeat4_last']}")
