"""Chat data for sequence-level distillation: the teacher answers a set of prompts, and the student is trained
on the teacher's full distribution over those answers (loss on response tokens only).

Prompts come from ``chat_prompts``:
- ``self`` (default, needs no file): Magpie-style (Xu et al. 2024) — the teacher's chat template is cut just
  before the user's message and the teacher samples the message itself, then answers it;
- a ``.jsonl`` file with one prompt per row under ``instruction``, ``prompt``, ``question`` or ``input``
  (with an optional ``context`` appended, as in Dolly), or a ``.txt`` file with one prompt per line.

Generation is batched (``generate.sample_continuations``: left padding, KV cache, finished rows leave the batch), shows a progress bar, and appends every
finished batch to ``<cache_dir>/chat-<fingerprint>.partial.jsonl``, so an interrupted run continues where it
stopped. The fingerprint covers the teacher's weights, the prompt source and the generation settings; a
finished cache is renamed to ``chat-<fingerprint>.jsonl`` and reused by every later run with the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import DataError
from ..progress import log, progress
from .step import Batch

PROMPT_KEYS = ("instruction", "prompt", "question", "input")
MARKER = "\x00USER\x00"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIGIANT_CACHE", "~/.cache/minigiant")).expanduser() / "distill"


def teacher_fingerprint(teacher) -> str:
    """Identifies the teacher's weights: its config plus a checksum of a strided sample of every tensor. The
    config's private keys (``_name_or_path``: where it was loaded from) and the library version are left out,
    so the same teacher loaded from another folder, or from its GGUF, finds the answers it already wrote."""
    config = {k: v for k, v in teacher.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float()
        h.update(name.encode())
        h.update(f"{tuple(tensor.shape)}:{sample.double().sum().item():.10e}:{sample.abs().double().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def read_prompts(spec: str) -> list[str]:
    """Prompts from a .jsonl or .txt file (see module doc); DataError when none is usable."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"chat prompt file {spec!r} does not exist; pass a .jsonl/.txt file of prompts or 'self' to let the teacher write them")
    prompts, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            text = next((row[k] for k in PROMPT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str) and row[k].strip()), None)
            if text is None:
                bad += 1
                continue
            context = row.get("context")
            prompts.append(text.strip() + (f"\n\n{context.strip()}" if isinstance(context, str) and context.strip() else ""))
        else:
            prompts.append(line.strip())
    if not prompts:
        raise DataError(f"{spec} has no usable prompt ({bad} row(s) without a non-empty {'/'.join(PROMPT_KEYS)} string); give one JSON object per line with an 'instruction' field")
    return prompts


def pre_query_ids(tokenizer) -> list[int]:
    """The chat template up to where the user's message starts (Magpie's pre-query template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_prompts: self needs a tokenizer with a chat template; pass a prompt file instead")
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False, add_generation_prompt=False)
    return tokenizer(text[: text.index(MARKER)], add_special_tokens=False)["input_ids"]


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the model's generation end-of-sequence ids, else the tokenizer's."""
    stops = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return set(stops if isinstance(stops, (list, tuple)) else [stops])


def _generate(teacher, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int, temperature: float, seed: int) -> list[tuple[str, int | None]]:
    """``(text, stop)`` for each prompt: ``sample_continuations`` decoded (``stop``: the end token, None if cut)."""
    from ..generate import pad_id, sample_continuations

    samples = sample_continuations(teacher, prompts_ids, pad_id(tokenizer), stop_ids(teacher, tokenizer), max_new_tokens, temperature, seed)
    return [(tokenizer.decode(ids, skip_special_tokens=True).strip(), stop) for ids, stop in samples]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


MAGPIE_TRIES = 4  # self-written prompts: give up after this many times the batches `chat_examples` needs


def _usable(rows: list[dict]) -> int:
    """How many rows hold an answer (a row with no prompt is a dropped prompt or an empty answer)."""
    return sum(bool(row["prompt"]) for row in rows)


def _through_usable(rows: list[dict], wanted: int) -> list[dict]:
    """``rows`` up to and including the ``wanted``-th usable one (a row with a prompt)."""
    usable = 0
    for i, row in enumerate(rows):
        usable += bool(row["prompt"])
        if usable == wanted:
            return rows[: i + 1]
    return rows


def teacher_answers(teacher, tokenizer, config, seed: int = 0) -> list[dict]:
    """``[{"prompt", "answer", "finished", "stop"}]``: the teacher's answers to the configured prompts, from the
    cache when present; ``chat_examples`` counts usable answers (rows whose ``prompt`` is None are dropped
    prompts or empty answers, kept so that the file holds whole batches)."""
    source = config.chat_prompts
    file_prompts = None if source == "self" else read_prompts(source)
    settings = {
        "teacher": teacher_fingerprint(teacher), "prompts": source if file_prompts is None else hashlib.sha256("\n".join(file_prompts).encode()).hexdigest()[:16],
        "examples": config.chat_examples, "max_new_tokens": config.chat_max_new_tokens, "temperature": config.chat_temperature, "seed": seed,
        "counting": "usable",  # caches from before chat_examples counted usable rows hold ~25% fewer: not reused
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    final, partial = cache_dir / f"chat-{fingerprint}.jsonl", cache_dir / f"chat-{fingerprint}.partial.jsonl"
    wanted, batch = config.chat_examples, config.chat_batch_size
    if final.is_file():
        rows = _through_usable([json.loads(line) for line in final.read_text().splitlines() if line.strip()], wanted)
        log(f"distill: {_usable(rows)} teacher answers from {final}")
        return rows
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()] if partial.is_file() else []
    usable = _usable(rows)
    # Batches at most: a prompt file runs out; the teacher's own prompts are retried a bounded number of times.
    most = -(-wanted // batch) * MAGPIE_TRIES if file_prompts is None else -(-len(file_prompts) // batch)
    if rows:
        log(f"distill: resuming teacher answers at {usable}/{wanted} ({partial})")
    teacher.eval()
    with progress() as bar, partial.open("a") as out:
        task = bar.add_task("teacher answers", total=wanted, completed=min(usable, wanted), info="")
        index = len(rows) // batch  # every batch but a prompt file's last writes `batch` rows
        while usable < wanted and index < most:
            if file_prompts is None:
                # Magpie: the teacher writes the user's message, stopping at its end-of-turn token.
                # Keep messages that ended by themselves and have a few words (a cut one is no question).
                n = batch
                written = _generate(teacher, tokenizer, [pre_query_ids(tokenizer)] * n, 64, 1.0, seed * 1_000_003 + 2 * index)
                keep = [text for text, stop in written if stop is not None and len(text.split()) >= 3]
            else:
                keep = file_prompts[index * batch : (index + 1) * batch]
                n = len(keep)
            answers = _generate(teacher, tokenizer, [prompt_ids(tokenizer, p) for p in keep], config.chat_max_new_tokens, config.chat_temperature, seed * 1_000_003 + 2 * index + 1) if keep else []
            new = [{"prompt": p, "answer": a, "finished": stop is not None, "stop": stop} for p, (a, stop) in zip(keep, answers) if a]
            # Keep whole batches in the file so a resumed run restarts at a batch boundary with the same seed.
            new += [{"prompt": None, "answer": None}] * (n - len(new))
            for row in new:
                out.write(json.dumps(row) + "\n")
            out.flush()
            rows.extend(new)
            usable += _usable(new)
            index += 1
            bar.update(task, completed=min(usable, wanted))
    partial.replace(final)
    short = f" (of {wanted} asked: {'the prompt file ran out' if file_prompts is not None else f'{len(rows) - usable} of {len(rows)} self-written prompts or answers were unusable'})" if usable < wanted else ""
    log(f"distill: {min(usable, wanted)} teacher answers cached in {final}{short}")
    return _through_usable(rows, wanted)


def chat_examples(tokenizer, rows: list[dict], block_size: int) -> list[tuple[list[int], int]]:
    """``(ids, prompt_length)`` per usable row: the prompt in the chat template, the answer and end-of-turn, cut
    to ``block_size``."""
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        if not row.get("prompt") or not row.get("answer"):
            continue
        prompt = prompt_ids(tokenizer, row["prompt"])
        # End-of-turn only after an answer the teacher finished (the end token it chose; the tokenizer's EOS for
        # rows cached before that was kept); one cut at max_new_tokens must not teach stopping mid-sentence.
        end = row.get("stop", eos)
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + ([end] if end is not None and row.get("finished", True) else [])
        ids = (prompt + answer)[:block_size]
        if len(prompt) < len(ids):  # at least one answer token survives the cut
            examples.append((ids, len(prompt)))
    if not examples:
        raise DataError(f"no usable chat example: every teacher answer was empty or its prompt is longer than block_size={block_size}; raise block_size or use shorter prompts")
    return examples


def chat_batch(examples: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-padded batch; only positions that predict an answer token are trained (``mask``)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    valid = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, (row, prompt_len) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
        mask[i, prompt_len - 1 : len(row) - 1] = True  # position p predicts token p + 1: the answer starts at prompt_len
    return Batch(ids, mask, valid, "chat")
