"""Data-free text: a model's own free-running samples (LLM-QAT's data-free generation, Liu et al. 2023;
self-calibration, Williams et al. 2025).

The model starts from its document separator and samples (temperature 1, top-p 0.95, ``SAMPLE_TOKENS`` new
tokens each, batches of ``BATCH``) until the samples hold the tokens asked. They are written as one .txt file
(samples separated by blank lines) under ``<cache_dir>/samples-<fingerprint>.txt``; the fingerprint covers
the model's weights, the token count, the seed and the precision it sampled in, so a later run with the same
model reads the file instead of generating again. The text spec ``samples`` (``resolve_samples``) names this
file wherever calibration text is read: it needs no data at all, and on the default teacher it calibrates a
width prune that is better balanced across domains than the shipped books (BENCHMARKS.md, 2026-12-03).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..errors import DataError
from ..progress import log, progress

SAMPLE_TOKENS = 256
BATCH = 32
SPEC = "samples"


def start_token(tokenizer) -> int:
    """The token a document starts after: ``<|endoftext|>`` where the vocabulary has it, else BOS, else EOS."""
    token = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(token, int) and token != tokenizer.unk_token_id:
        return token
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def model_samples(model, tokenizer, tokens: int, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Path of a .txt file of at least ``tokens`` tokens that ``model`` sampled freely (cached, see module doc)."""
    from .. import artifact
    from ..distill.chat import default_cache_dir, sample_continuations, stop_ids, teacher_fingerprint
    from ..generate import pad_id
    from ..hardware import native_bf16

    precision = "bf16" if native_bf16() else "fp32"
    settings = {"model": teacher_fingerprint(model), "tokens": tokens, "seed": seed, "precision": precision,
                "sample_tokens": SAMPLE_TOKENS, "batch": BATCH, "temperature": 1.0, "top_p": 0.95}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "samples"
    path = directory / f"samples-{fingerprint}.txt"
    if path.is_file():
        log(f"samples: {path} (cached)")
        return path
    # Sampling only: a bf16 copy decodes about twice as fast where bf16 is native, and the original stays as it was.
    sampler = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
    sampler.eval()
    texts, count, index = [], 0, 0
    with progress() as bar:
        task = bar.add_task("model samples", total=tokens, info="tokens")
        while count < tokens:
            batch = sample_continuations(sampler, [[start_token(tokenizer)]] * BATCH, pad_id(tokenizer), stop_ids(model, tokenizer),
                                         SAMPLE_TOKENS, 1.0, seed * 1_000_003 + index)
            for ids, _ in batch:
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if text:
                    texts.append(text)
                    count += len(ids)
            index += 1
            bar.update(task, completed=min(count, tokens))
            if index >= 4 and count < index * BATCH:  # under one token per sample: the model ends at once
                raise DataError(f"the model's free-running samples are empty ({count} tokens in {index * BATCH} samples); calibrate on a text file instead")
    del sampler
    directory.mkdir(parents=True, exist_ok=True)
    artifact.write_atomic(path, "\n\n".join(texts) + "\n")
    log(f"samples: {len(texts)} samples, {count:,} tokens in {path}")
    return path


def resolve_samples(spec: str, model, tokenizer, tokens: int, seed: int = 0) -> str:
    """``spec`` with the part ``samples`` (alone or in a ``+`` mix such as ``corpus:train+samples``) replaced
    by the path of the model's samples, sized for that part's share of ``tokens``; other specs unchanged."""
    parts = spec.split("+")
    if SPEC not in parts:
        return spec
    share = -(-tokens // len(parts))
    path = str(model_samples(model, tokenizer, int(share * 1.15) + SAMPLE_TOKENS, seed))  # blocks cut across samples lose a little
    return "+".join(path if part == SPEC else part for part in parts)
