"""Healing quality at an equal number of optimizer steps: the same pruned student distilled with different
objectives and data, then WikiText-2 perplexity (first 8 × 1024-token windows; ratio to the teacher), top-1
agreement with the teacher on those windows, and the repeated-4-gram rate of greedy answers to 10 held-out
chat prompts (the last 10 context-free Dolly rows, which the default recipe never trains on; the teacher's
own answers give the reference rate).

    PYTHONPATH=src python benchmarks/distill_quality.py --student runs/baseline/01-prune --teacher runs/baseline/00-teacher --steps 24 --threads 1

(the directories come from `minigiant run --output runs/baseline`). Appends rows to benchmarks/results/distill.json.
Steps, not minutes, make the comparison fair on a shared CPU; seconds are reported but were measured while
other jobs shared the 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch

import minigiant
from minigiant.data.text import tokenize_documents
from minigiant.evaluate.prompts import answer
from shared_data import DATA, wikitext2_test

RESULTS = Path(__file__).parent / "results" / "distill.json"

VARIANTS = {
    "no healing": None,
    "CE only": {"kd_weight": 0.0, "ce_weight": 1.0},
    "logit KD": {},
    "logit + hidden KD": {"hidden_weight": 1.0},
    "logit + attention relation": {"attention_weight": 1.0},
    "chat-data KD": {"chat_fraction": 1.0, "chat_examples": 16, "chat_max_new_tokens": 80},
    "mix 50% chat": {"chat_fraction": 0.5, "chat_examples": 16, "chat_max_new_tokens": 80},
}


def held_out_prompts(n: int = 10) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "instruct" / "dolly_subset151.jsonl").read_text().splitlines() if line.strip()]
    return [r["instruction"] for r in rows if not r.get("context")][-n:]


def repeated_4gram_rate(tokenizer, text: str) -> float:
    """Share of the answer's token 4-grams that already occurred earlier in the same answer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


@torch.inference_mode()
def score(model, tokenizer, ids, teacher_top1, prompts, answers: bool = True) -> dict:
    """WikiText-2 perplexity and top-1 predictions in one pass over the 8 windows, then the chat answers."""
    nll, top1 = 0.0, []
    for i in range(8):
        window = ids[i * 1024 : (i + 1) * 1024]
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        top1.append(logits.argmax(-1))
    top1 = torch.cat(top1)
    answers = [answer(model, tokenizer, p, max_new_tokens=64) for p in prompts] if answers else []
    rep = sum(repeated_4gram_rate(tokenizer, a) for a in answers) / len(answers) if answers else None
    return {"ppl": round(math.exp(nll / (8 * 1023)), 2), "top1": top1, "repeated_4gram_rate": round(rep, 4) if rep is not None else None, "answers": answers[:3],
            "top1_agreement": round((top1 == teacher_top1).float().mean().item(), 4) if teacher_top1 is not None else None}


def append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(existing + [row], indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from: " + ", ".join(VARIANTS))
    parser.add_argument("--set", default="{}", help="JSON settings added to every variant")
    parser.add_argument("--no-teacher-answers", action="store_true", help="skip the teacher's chat answers (another process records the teacher row)")
    parser.add_argument("--teacher-ppl", type=float, help="the teacher's WikiText-2 ppl from an earlier run (skips the teacher pass; implies --no-teacher-answers)")
    parser.add_argument("--threads", type=int, default=2, help="1 is faster on a CPU busy with other jobs (no OpenMP spinning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tokenizer = minigiant.load(args.teacher)
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    prompts = held_out_prompts()
    if args.teacher_ppl:  # measured by another run: skip the teacher pass (top-1 agreement is then not reported)
        reference, teacher_top1 = {"ppl": args.teacher_ppl}, None
    else:
        reference = score(teacher, tokenizer, ids, None, prompts, answers=not args.no_teacher_answers)
        teacher_top1 = reference.pop("top1")
    print(f"teacher: {reference}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    if not (args.no_teacher_answers or args.teacher_ppl):
        append({"benchmark": "distill_quality", "time": stamp, "variant": "teacher", **reference})
    for name in args.variants:
        student, _ = minigiant.load(args.student)
        settings = None
        metrics = {}
        if VARIANTS[name] is not None:
            settings = {"max_steps": args.steps, "warmup_steps": max(1, args.steps // 10), "eval_every": max(1, args.steps // 2), "eval_windows": 2, **json.loads(args.set), **VARIANTS[name]}
            ctx = minigiant.Context(tokenizer=tokenizer, teacher=teacher)
            start = time.perf_counter()
            minigiant.distill(student, minigiant.DistillConfig(**settings), ctx)
            metrics = minigiant.artifact.lineage(student)["stages"][-1]["metrics"]
            metrics["wall_seconds_with_data"] = round(time.perf_counter() - start, 1)
        result = score(student, tokenizer, ids, teacher_top1, prompts)
        del result["top1"]
        row = {
            "benchmark": "distill_quality", "time": stamp, "variant": name, "settings": settings, **result,
            "ppl_ratio": round(result["ppl"] / reference["ppl"], 3),
            **{k: metrics.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s", "wall_seconds_with_data", "final_loss", "eval_curve", "chat_examples")},
            "note": "2-core CPU shared with other jobs: seconds are not comparable across rows",
        }
        print(json.dumps(row), flush=True)
        append(row)


if __name__ == "__main__":
    main()
