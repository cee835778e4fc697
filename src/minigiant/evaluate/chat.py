"""Chat quality on held-out instructions, judged without a bigger model:

- every model answers each instruction (chat template, greedy under the repetition settings its
  ``generation_config.json`` names, at most ``max_new_tokens``);
- the teacher scores each answer: its mean negative log-likelihood per answer token, given the prompt
  (how natural the answer is to the model we distilled from; the teacher's own greedy answers are the
  reference, and a student drifting into nonsense scores high);
- the same NLL over the answer's fresh tokens only, those that do not complete a token 4-gram already in the
  answer: shown a loop, the teacher predicts its next turn (p ≈ 0.74, benchmarks/chat_loops.py), so a looping
  answer scores a *low* NLL on its repeats, and the fresh-token NLL is the one that loops cannot flatter;
- the repeated-4-gram rate of the answers (looping text), and the shares of empty and truncated answers.

Instructions come from a JSONL file (one object per line with ``instruction``, or ``prompt``, and an
optional ``context``) or, by default, the short set shipped in ``instructions.jsonl`` (written for
minigiant; no benchmark data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError

BUILTIN = Path(__file__).parent / "instructions.jsonl"


def load_instructions(spec: str = "builtin", limit: int | None = None) -> list[str]:
    """User messages from ``spec`` ("builtin" or a JSONL path); a ``context`` field is appended to its
    instruction the way Dolly-style data pairs them."""
    path = BUILTIN if spec == "builtin" else Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"instruction file {spec} does not exist; pass a JSONL file with an 'instruction' field per line, or 'builtin'")
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            text = row.get("instruction") or row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                continue
            context = row.get("context")
            prompts.append(f"{text.strip()}\n\n{context.strip()}" if isinstance(context, str) and context.strip() else text.strip())
    if not prompts:
        raise DataError(f"instruction file {path} has no usable prompts; each line must be a JSON object with a non-empty 'instruction' (or 'prompt') string")
    return prompts[:limit] if limit else prompts


def repeated_ngram_rate(texts: list[str], n: int = 4) -> float | None:
    """Share of word n-grams that repeat an earlier n-gram of the same text, over all texts (None when no
    text has n words). 0 for text that never loops; "a b c d a b c d" gives 1/5."""
    total = repeated = 0
    for text in texts:
        words = text.split()
        seen = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            total += 1
            if gram in seen:
                repeated += 1
            seen.add(gram)
    return repeated / total if total else None


def completes_repeat(tokens: list[int], n: int = 4) -> list[bool]:
    """For each token, whether it completes an n-gram that already occurred earlier in ``tokens`` (a loop's
    next turn). ``[1, 2, 1, 2, 1]`` with n = 2: ``1 2`` and ``2 1`` come back at the last two tokens, so
    ``[F, F, F, T, T]``."""
    seen: set[tuple[int, ...]] = set()
    flags = [False] * min(len(tokens), n - 1)
    for end in range(n, len(tokens) + 1):
        gram = tuple(tokens[end - n : end])
        flags.append(gram in seen)
        seen.add(gram)
    return flags


ANSWER_BATCH = 16  # instructions answered at once: a decode step of 16 rows costs about 3 of one row on a CPU
PREFILL_TOKENS = 4096  # prompt tokens, padding included, in one batch of answers
LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits one judge forward may return


def length_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length, shortest first: at most ``max_rows`` rows and, padded
    to the longest, at most ``max_tokens`` tokens (a longer row goes alone). Padding to the longest row in a
    batch costs compute, and the Dolly prompts run from 10 to 1,800 tokens."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def answer_instructions(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[dict]:
    """Greedy answers, decoded as the model's generation config asks (``generate.model_decoding``: as it is served):
    ``{"prompt", "answer", "ids" (prompt ids), "answer_ids", "truncated"}`` each; an
    answer is truncated when it used all ``max_new_tokens`` without ending (no EOS). ``answer_ids`` keeps the
    end-of-turn token of an answer that ended: ending is part of the answer the judge scores."""
    from ..distill.chat import stop_ids
    from ..generate import model_decoding, pad_id, prompt_ids, sample_continuations

    decoding = model_decoding(model)
    stops = stop_ids(model, tokenizer)
    ids = [prompt_ids(tokenizer, prompt)[0].tolist() for prompt in prompts]
    out: list[dict] = [{} for _ in prompts]
    for batch in length_batches([len(p) for p in ids], ANSWER_BATCH, PREFILL_TOKENS):
        for i, (generated, stop) in zip(batch, sample_continuations(model, [ids[i] for i in batch], pad_id(tokenizer), stops, max_new_tokens, 0.0, 0,
                                                                  **decoding)):
            out[i] = {
                "prompt": prompts[i],
                "answer": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                "ids": ids[i],
                "answer_ids": generated + ([stop] if stop is not None else []),
                "truncated": stop is None and len(generated) >= max_new_tokens,
            }
    return out


@torch.inference_mode()
def judge_token_nlls(judge, pairs: list[tuple[list[int], list[int]]], batch_size: int = ANSWER_BATCH) -> list[list[float]]:
    """The judge's negative log-likelihood of each answer token, given the prompt and the answer before it, for
    each ``(prompt ids, answer ids)`` (an empty list for an empty answer), scored in right-padded batches."""
    scores: list[list[float]] = [[] for _ in pairs]
    todo = [i for i, (_, answer) in enumerate(pairs) if answer]
    if any(not pairs[i][0] for i in todo):
        raise ValueError("judge_token_nlls: every answer needs a prompt of at least one token (the chat template gives one) to predict its first token from")
    vocab = judge.get_output_embeddings().out_features if judge.get_output_embeddings() is not None else judge.config.vocab_size
    # The forward returns logits for every position: with long prompts (Dolly's contexts) 16 rows of 49k-token
    # float32 logits would take gigabytes, so a batch holds at most ~256 MB of them.
    for batch in length_batches([len(pairs[i][0]) + len(pairs[i][1]) for i in todo], batch_size, max(1, LOGITS_BUDGET // (vocab * 4))):
        rows = [todo[b] for b in batch]
        sequences = [pairs[i][0] + pairs[i][1] for i in rows]
        width = max(len(seq) for seq in sequences)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, seq in enumerate(sequences):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = judge(input_ids=ids.to(judge.device), attention_mask=mask.to(judge.device), use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none")  # position p predicts p + 1
        for r, i in enumerate(rows):
            prompt, answer = pairs[i]
            scores[i] = losses[r, len(prompt) - 1 : len(prompt) - 1 + len(answer)].tolist()
    return scores


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of ``values`` (sample standard deviation / √n; None under two values)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def chat_quality(model, tokenizer, judge, prompts: list[str], max_new_tokens: int = 64) -> dict:
    """Answers and their scores (see the module doc). ``judge`` is the teacher (the model itself when it is
    the teacher); its NLL of each answer is averaged over answers, each answer weighing the same."""
    answers = answer_instructions(model, tokenizer, prompts, max_new_tokens)
    token_nlls = judge_token_nlls(judge, [(a["ids"], a["answer_ids"]) for a in answers]) if judge is not None else [[] for _ in answers]
    for a, nlls in zip(answers, token_nlls):
        a["judge_nll"] = mean_or_none(nlls)
        a["judge_nll_fresh"] = mean_or_none([nll for nll, repeat in zip(nlls, completes_repeat(a["answer_ids"])) if not repeat])
    per_answer = [a["judge_nll"] for a in answers if a["judge_nll"] is not None]
    texts = [a["answer"] for a in answers]
    return {
        "chat_judge_nll": mean_or_none(per_answer),
        "chat_judge_nll_stderr": standard_error(per_answer),
        "chat_judge_nll_fresh": mean_or_none([a["judge_nll_fresh"] for a in answers if a["judge_nll_fresh"] is not None]),
        "chat_repeat4_rate": repeated_ngram_rate(texts, 4),
        "chat_empty_rate": sum(not t for t in texts) / len(texts),
        "chat_truncated_rate": sum(a["truncated"] for a in answers) / len(answers),
        "chat_answers": [{k: a[k] for k in ("prompt", "answer", "truncated", "judge_nll", "judge_nll_fresh")} for a in answers],
    }
