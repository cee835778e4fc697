"""Chat quality on held-out instructions, judged without a bigger model:

- every model answers each instruction (chat template, greedy, at most ``max_new_tokens``);
- the teacher scores each answer: its mean negative log-likelihood per answer token, given the prompt
  (how natural the answer is to the model we distilled from; the teacher's own greedy answers are the
  reference, and a student drifting into repetition or nonsense scores high);
- the repeated-4-gram rate of the answers (looping text), and the shares of empty and truncated answers.

Instructions come from a JSONL file (one object per line with ``instruction``, or ``prompt``, and an
optional ``context``) or, by default, the short set shipped in ``instructions.jsonl`` (written for
minigiant; no benchmark data).
"""

from __future__ import annotations

import json
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


@torch.inference_mode()
def answer_instructions(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[dict]:
    """Greedy answers: ``{"prompt", "answer", "ids" (prompt ids), "answer_ids", "truncated"}`` each; an
    answer is truncated when it used all ``max_new_tokens`` without ending (no EOS)."""
    from ..generate import pad_id, prompt_ids

    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        generated = model.generate(
            ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
        )[0, ids.shape[1] :].tolist()
        ended = eos is not None and eos in generated
        if ended:
            generated = generated[: generated.index(eos) + 1]  # keep the EOS: ending is part of the answer
        out.append({
            "prompt": prompt,
            "answer": tokenizer.decode(generated, skip_special_tokens=True).strip(),
            "ids": ids[0].tolist(),
            "answer_ids": generated,
            "truncated": not ended and len(generated) >= max_new_tokens,
        })
    return out


@torch.inference_mode()
def judge_nll(judge, prompt_ids: list[int], answer_ids: list[int]) -> float | None:
    """The judge's mean negative log-likelihood per answer token, given the prompt (None for no tokens)."""
    if not answer_ids:
        return None
    ids = torch.tensor([prompt_ids + answer_ids], device=judge.device)
    logits = judge(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    return F.cross_entropy(logits, ids[0, len(prompt_ids) :]).item()


def chat_quality(model, tokenizer, judge, prompts: list[str], max_new_tokens: int = 64) -> dict:
    """Answers and their scores (see the module doc). ``judge`` is the teacher (the model itself when it is
    the teacher); its NLL of each answer is averaged over answers, each answer weighing the same."""
    answers = answer_instructions(model, tokenizer, prompts, max_new_tokens)
    nlls = []
    for a in answers:
        a["judge_nll"] = judge_nll(judge, a["ids"], a["answer_ids"]) if judge is not None else None
        if a["judge_nll"] is not None:
            nlls.append(a["judge_nll"])
    texts = [a["answer"] for a in answers]
    return {
        "chat_judge_nll": sum(nlls) / len(nlls) if nlls else None,
        "chat_repeat4_rate": repeated_ngram_rate(texts, 4),
        "chat_empty_rate": sum(not t for t in texts) / len(texts),
        "chat_truncated_rate": sum(a["truncated"] for a in answers) / len(answers),
        "chat_answers": [{"prompt": a["prompt"], "answer": a["answer"], "truncated": a["truncated"], "judge_nll": a["judge_nll"]} for a in answers],
    }
