"""The micro-batches of a distillation run: text blocks and chat examples, mixed by ``chat_fraction``; a share
``on_policy_fraction`` of the chat batches is answered by the student itself (``on_policy.py``)."""

from __future__ import annotations

import random

import torch

from ..data import sample_blocks
from ..errors import DataError
from ..generate import pad_id
from .step import Batch, text_batch


def _epoch_pick(n: int, batch_size: int, index: int, seed: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of batch ``index``: epochs over ``n`` items, each in its own seeded order (so resume is exact).
    With ``lengths``, each batch holds items of similar length, so a right-padded batch carries little padding
    (transformers' ``group_by_length``): the epoch's shuffled items are sorted by length (the shuffle breaks ties
    differently each epoch), cut into batches, and the batches visited in a seeded random order."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if lengths is not None:
        order = order[torch.sort(lengths[order], stable=True).indices]
        i = int(torch.randperm(per_epoch, generator=generator)[i])
    return order[i * batch_size : (i + 1) * batch_size]


class TrainingData:
    """The micro-batch for each global index: chat or text by a seeded coin (``chat_fraction``), then the next
    batch of that source; a pure function of (seed, index), which makes resuming exact."""

    def __init__(self, tokenizer, teacher, config, seed: int, processes: int = 1):
        self.config, self.seed = config, seed
        self.pad = pad_id(tokenizer)
        n = config.max_steps * config.batch_size * config.grad_accum * processes
        self.blocks = self.chat = None
        self.on_policy = None  # an on_policy.OnPolicySampler, set by the trainer (it needs the student)
        self.on_policy_from = 0  # first micro-batch index that may be on-policy (on_policy_start; set by the trainer)
        if config.chat_fraction < 1:
            self.blocks = sample_blocks(tokenizer, config.text, config.block_size, n, seed, what="training text")
            if self.blocks.shape[0] < config.batch_size:
                raise DataError(f"training text gives {self.blocks.shape[0]} block(s) of {config.block_size} tokens, fewer than one batch ({config.batch_size}); give more text or lower batch_size/block_size")
        if config.chat_fraction > 0:
            from .chat import chat_examples, teacher_answers

            self.chat = chat_examples(tokenizer, teacher_answers(teacher, tokenizer, config, seed), config.block_size)
            self.chat_lengths = torch.tensor([len(ids) for ids, _ in self.chat])

    def kind(self, index: int) -> str:
        """``text``, ``chat`` (the teacher's answers) or ``on_policy`` (the student answers the same prompts)."""
        if self.chat is None:
            return "text"
        if self.blocks is not None and random.Random(self.seed * 7919 + index).random() >= self.config.chat_fraction:
            return "text"
        # A coin of its own (a string seed): Random(seed * k + index) would be the chat coin's stream at seed 0.
        on_policy = self.config.on_policy_fraction > 0 and index >= self.on_policy_from and random.Random(f"on_policy:{self.seed}:{index}").random() < self.config.on_policy_fraction
        return "on_policy" if on_policy else "chat"

    def batch(self, index: int) -> Batch:
        from .chat import chat_batch

        kind = self.kind(index)
        if kind == "text":
            picked = _epoch_pick(self.blocks.shape[0], self.config.batch_size, index, self.seed)
            return text_batch(self.blocks[picked], picked)
        # Chat answers run from a few dozen tokens to block_size: batches of similar lengths pad little.
        lengths = self.chat_lengths if self.config.chat_group_by_length else None
        picked = _epoch_pick(len(self.chat), min(self.config.batch_size, len(self.chat)), index, self.seed + 1, lengths)
        examples = [self.chat[i] for i in picked.tolist()]
        if kind == "on_policy":
            if self.on_policy is None:
                raise RuntimeError("TrainingData: on-policy batches need a sampler (data.on_policy)")
            return self.on_policy(examples, index)
        return chat_batch(examples, self.pad)
