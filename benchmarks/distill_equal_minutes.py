"""Distillation variants at equal minutes on one pruned student. Each variant distills a fresh copy of the
student for ``--minutes`` with the default recipe's distill settings plus the variant's own, then is measured
on WikiText-2 raw test (first 8 × 1024 tokens), the packaged held-out books (first 4 × 1024 tokens) and the
chat metrics on held-out Dolly instructions (teacher-judged NLL per answer token, repeated 4-grams, greedy,
64 new tokens). Rows go to benchmarks/results/distill.json under ``--label`` (earlier rows of that label are
replaced). Run it alone: the variants share one time budget each, so a busy CPU changes what they learn.

    PYTHONPATH=src .venv/bin/python benchmarks/distill_equal_minutes.py runs/bench/01-prune --teacher runs/bench/00-teacher \
        --minutes 5 --label on_policy --variant 'KD (default recipe)={}' --variant 'on-policy, half the chat steps={"on_policy_fraction": 0.5}'
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_throughput import AUTOGRAD_KL  # noqa: E402,F401  (registers the loss name for --variant '{"loss": "kl (autograd)"}')
from shared_data import DATA, wikitext2_test  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distill.json"
RECIPE = ROOT / "src" / "minigiant" / "recipes" / "default.yaml"


def default_distill_settings() -> dict:
    stage = next(s["distill"] for s in yaml.safe_load(RECIPE.read_text())["stages"] if "distill" in s)
    return {k: v for k, v in stage.items() if k not in ("minutes", "eval_every", "eval_windows")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="pruned student directory (every variant starts from it)")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--minutes", type=float, default=5.0, help="0: no time budget, each variant runs its max_steps (equal steps instead of equal minutes)")
    parser.add_argument("--label", required=True, help="the 'benchmark' name of the rows in distill.json")
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON: distill settings over the default recipe's (\"student\": DIR starts that variant from another student, \"minutes\": M gives it its own budget)")
    parser.add_argument("--instructions", type=int, default=32, help="held-out Dolly instructions for the chat metrics")
    parser.add_argument("--no-reference", action="store_true", help="do not measure the teacher (its row is the same in every run; ~4 min on 2 AVX2 cores)")
    parser.add_argument("--save", metavar="DIR", help="also save each distilled variant as DIR/NN (a model directory, to evaluate again later)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import minigiant
    from minigiant.data.text import load_documents, tokenize_documents
    from minigiant.evaluate.chat import chat_quality, load_instructions
    from minigiant.evaluate.perplexity import perplexity
    from minigiant.hardware import describe_cpu

    teacher, tokenizer = minigiant.load(args.teacher)
    teacher.eval()
    wiki = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    books = tokenize_documents(tokenizer, load_documents("corpus:heldout"), max_tokens=4 * 1024 + 1)
    prompts = load_instructions(str(DATA / "instruct" / "dolly_subset151.jsonl"), args.instructions)
    base = default_distill_settings()
    cpu = describe_cpu()

    def measure(model) -> dict:
        chat = chat_quality(model, tokenizer, teacher, prompts, max_new_tokens=64)
        return {"wikitext2_ppl_8x1024": round(perplexity(model, wiki)["ppl"], 2), "corpus_heldout_ppl_4x1024": round(perplexity(model, books, max_windows=4)["ppl"], 2),
                **{k: round(chat[k], 4) for k in ("chat_judge_nll", "chat_judge_nll_fresh", "chat_repeat4_rate", "chat_empty_rate", "chat_truncated_rate") if chat[k] is not None}}

    if base.get("chat_fraction", 0) > 0:
        # The teacher's chat answers are cached by the first distillation that needs them: make them here, or
        # the first variant alone would spend part of its minutes on them.
        warm, _ = minigiant.load(args.student)
        minigiant.distill(warm, minigiant.DistillConfig(**{**base, "max_steps": 1, "minutes": None}), minigiant.Context(tokenizer=tokenizer, teacher=teacher))
        del warm
    rows = [] if args.no_reference else [{"variant": "teacher (reference)", **measure(teacher)}]
    if rows:
        print(json.dumps(rows[0]), flush=True)
    for index, spec in enumerate(args.variant, 1):
        name, _, settings = spec.partition("=")
        settings = json.loads(settings or "{}")
        student_dir = settings.pop("student", args.student)  # a variant may start from another pruned student
        minutes = settings.pop("minutes", args.minutes)  # ... or have its own budget (a prune that took longer leaves less)
        student, _ = minigiant.load(student_dir)
        started = time.perf_counter()
        minigiant.distill(student, minigiant.DistillConfig(**{**base, **settings, "minutes": minutes or None}), minigiant.Context(tokenizer=tokenizer, teacher=teacher))
        metrics = minigiant.artifact.lineage(student)["stages"][-1]["metrics"]
        row = {"variant": name, "settings": settings, "student": student_dir, "minutes": minutes, "wall_seconds": round(time.perf_counter() - started, 1), "steps": metrics["steps"], "tokens": metrics["tokens"],
               **({"on_policy": metrics["on_policy"]} if "on_policy" in metrics else {}), **measure(student)}
        if args.save:
            row["saved"] = str(Path(args.save) / f"{index:02d}")
            minigiant.artifact.save(student, tokenizer, row["saved"], overwrite=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del student

    when = datetime.date.today().isoformat()
    command = "PYTHONPATH=src .venv/bin/python benchmarks/distill_equal_minutes.py " + " ".join(
        f"'{a}'" if " " in a or "{" in a else a for a in sys.argv[1:])
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    new = [{"benchmark": args.label, "time": when, "command": command, "minutes": args.minutes, "student": args.student, "cpu": cpu, **r} for r in rows]
    RESULTS.write_text(json.dumps([r for r in old if r.get("benchmark") != args.label] + new, indent=1) + "\n")
    print(f"{len(new)} rows → {RESULTS.relative_to(ROOT)} (benchmark {args.label!r})")


if __name__ == "__main__":
    main()
