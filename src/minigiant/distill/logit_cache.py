"""A teacher top-k logit cache on disk (offline KD, as in DistillKit): the teacher's k most likely tokens and
their log-probabilities at every position of every training block, memory-mapped, filled the first time a
block is seen and read back instead of running the teacher afterwards (a rerun, a sweep over student
settings, a second epoch).

Tail handling: the cache keeps the exact log-probabilities of the top k tokens (temperature 1); the mass
left, 1 − Σ top-k p, is spread evenly over the other V − k tokens when the dense distribution is rebuilt,
so the student still learns how much probability the tail holds, just not its shape. With k = V the
rebuilt distribution is the teacher's, and training equals online distillation. Minitron reports that
k ≤ 100 hurts; the default keeps 256. The temperature is applied to the rebuilt distribution at loss time.

The cache is fingerprinted to the teacher's weights, the block size, k, the training text and the seed
(which choose the blocks); a cache made for anything else is refused, never silently reused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError


class LogitCache:
    def __init__(self, folder: str | Path, fingerprint: dict, blocks: int, block_size: int, k: int, vocab: int):
        self.dir = Path(folder).expanduser()
        self.k, self.vocab = min(k, vocab), vocab
        meta = {**fingerprint, "blocks": blocks, "block_size": block_size, "k": self.k, "vocab": vocab}
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            saved = json.loads(meta_file.read_text())
            if saved != meta:
                differ = ", ".join(sorted(key for key in set(saved) | set(meta) if saved.get(key) != meta.get(key)))
                raise ConfigError(f"logit cache {self.dir} was built for another setup ({differ} differ); point logit_cache at a new folder or delete it")
            mode = "r+"
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            mode = "w+"
        shape = (blocks, block_size, self.k)
        self.indices = np.lib.format.open_memmap(self.dir / "indices.npy", mode=mode, dtype=np.int32, shape=shape)
        self.logprobs = np.lib.format.open_memmap(self.dir / "logprobs.npy", mode=mode, dtype=np.float32, shape=shape)
        self.filled = np.lib.format.open_memmap(self.dir / "filled.npy", mode=mode, dtype=np.bool_, shape=(blocks,))
        if mode == "w+":
            meta_file.write_text(json.dumps(meta))

    def has(self, blocks: torch.Tensor) -> bool:
        return bool(self.filled[blocks.numpy()].all())

    def store(self, blocks: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Keep the top-k log-probabilities of ``[len(blocks), T, V]`` teacher logits."""
        logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
        values, indices = logprobs.topk(self.k, dim=-1)
        b = blocks.numpy()
        self.indices[b] = indices.to(torch.int32).numpy()
        self.logprobs[b] = values.numpy()
        self.filled[b] = True
        self.filled.flush()

    def dense(self, blocks: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
        """Teacher log-probabilities ``[len(rows), V]`` for flat positions ``rows`` of the batch of ``blocks``."""
        b = blocks.numpy()[(rows // block_size).numpy()]
        t = (rows % block_size).numpy()
        indices = torch.from_numpy(np.asarray(self.indices[b, t])).long()
        values = torch.from_numpy(np.asarray(self.logprobs[b, t]))
        tail = self.vocab - self.k
        if tail:
            rest = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12)  # mass outside the top k
            out = (rest / tail).log().expand(len(rows), self.vocab).clone()
        else:
            out = torch.full((len(rows), self.vocab), -math.inf)
        return out.scatter_(1, indices, values)
