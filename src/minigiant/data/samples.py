"""Data-free text: a model's own free-running samples (LLM-QAT's data-free generation, Liu et al. 2023;
self-calibration, Williams et al. 2025).

The model starts from its document separator and samples (temperature 1, top-p 0.95, ``SAMPLE_TOKENS`` new
tokens each, batches of ``BATCH``) until the samples hold the tokens asked. They are written as one .txt file
(samples separated by blank lines) under ``<cache_dir>/samples-<fingerprint>-<batches>.txt``, made from
``samples-<fingerprint>.json``; the fingerprint covers the model's weights, the seed and the precision it
sampled in, so a later run with the same model reads the file instead of generating again, and one that asks
for more tokens generates only the batches missing. The text spec ``samples`` (``resolve_samples``) names this
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
    """Path of a .txt file of at least ``tokens`` tokens that ``model`` sampled freely (cached, see module doc).

    Batch ``i`` is sampled with seed ``seed * 1_000_003 + i``, so a cache that holds fewer tokens than asked
    is extended with the batches it lacks: asking for more never changes the samples already there."""
    from .. import artifact
    from ..distill.chat import default_cache_dir, stop_ids, teacher_fingerprint
    from ..generate import pad_id, sample_continuations
    from ..hardware import native_bf16

    precision = "bf16" if native_bf16() else "fp32"
    settings = {"model": teacher_fingerprint(model), "seed": seed, "precision": precision,
                "sample_tokens": SAMPLE_TOKENS, "batch": BATCH, "temperature": 1.0, "top_p": 0.95}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "samples"
    store = directory / f"samples-{fingerprint}.json"  # {"batches", "tokens", "samples"}: what the text file is made from
    state = json.loads(store.read_text()) if store.is_file() else {"batches": 0, "tokens": 0, "samples": []}
    if state["tokens"] < tokens:
        # Sampling only: a bf16 copy decodes about twice as fast where bf16 is native; the model stays as it was.
        sampler = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
        sampler.eval()
        with progress() as bar:
            task = bar.add_task("model samples", total=tokens, completed=state["tokens"], info="tokens")
            while state["tokens"] < tokens:
                batch = sample_continuations(sampler, [[start_token(tokenizer)]] * BATCH, pad_id(tokenizer), stop_ids(model, tokenizer),
                                             SAMPLE_TOKENS, 1.0, seed * 1_000_003 + state["batches"])
                for ids, _ in batch:
                    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    if text:
                        state["samples"].append(text)
                        state["tokens"] += len(ids)
                state["batches"] += 1
                bar.update(task, completed=min(state["tokens"], tokens))
                if state["batches"] >= 4 and state["tokens"] < state["batches"] * BATCH:  # under a token per sample
                    raise DataError(f"the model's free-running samples are empty ({state['tokens']} tokens in {state['batches'] * BATCH} samples); calibrate on a text file instead")
        del sampler
        directory.mkdir(parents=True, exist_ok=True)
        artifact.write_atomic(store, json.dumps(state))
        log(f"samples: {len(state['samples'])} samples, {state['tokens']:,} tokens in {store}")
    path = directory / f"samples-{fingerprint}-{state['batches']}.txt"  # named by its batches: never a stale file
    if not path.is_file():
        for old in directory.glob(f"samples-{fingerprint}-*.txt"):
            old.unlink()
        artifact.write_atomic(path, "\n\n".join(state["samples"]) + "\n")
    else:
        log(f"samples: {path} (cached)")
    return path


def resolve_samples(spec: str, model, tokenizer, tokens: int, seed: int = 0) -> str:
    """``spec`` with the part ``samples`` (alone or in a ``+`` mix such as ``corpus:train+samples``) replaced
    by the path of the model's samples, sized for that part's share of ``tokens``; other specs unchanged."""
    from .text import spec_parts

    parts = spec_parts(spec)
    if SPEC not in parts:
        return spec
    share = -(-tokens // len(parts))
    path = str(model_samples(model, tokenizer, int(share * 1.15) + SAMPLE_TOKENS, seed))  # blocks cut across samples lose a little
    return "+".join(path if part == SPEC else part for part in parts)
