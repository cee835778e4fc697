"""Evaluate saved models on lm-eval tasks (shared dev files), teacher agreement, chat quality and cost, and
append one JSON row per model to benchmarks/results/evaluate.json.

    # the default run's five models (the first is the teacher: the reference and the chat judge)
    python benchmarks/eval_models.py runs/baseline/00-teacher runs/baseline/01-prune runs/baseline/02-distill \
        runs/baseline/03-int8 runs/baseline/04-int4 --label baseline --limit 200 --gsm8k-limit 32 --output runs/baseline/eval
    # the teacher alone on the full dev files (validation against published scores)
    python benchmarks/eval_models.py runs/baseline/00-teacher --label teacher-full-dev \
        --tasks hellaswag,arc_easy,arc_challenge,piqa --limit 0 --instructions none --output runs/teacher-full-dev

One thread per process (OMP_NUM_THREADS=1): on a shared 2-core machine two OpenMP threads spinning beside
other work made generation 17× slower (measured: 64 tokens in 215 s with 2 threads, 13 s with 1).
GSM8K generates up to 256 tokens per question, so it runs with its own (smaller) limit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_data import DATA  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "evaluate.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--label", required=True, help="names this set of rows in the results file")
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=200, help="examples per task; 0 = the whole dev file")
    parser.add_argument("--gsm8k-limit", type=int, default=32, help="GSM8K questions (0: skip GSM8K)")
    parser.add_argument("--instructions", default=str(DATA / "instruct" / "dolly_subset151.jsonl"), help="JSONL, 'builtin' or 'none'")
    parser.add_argument("--max-instructions", type=int, default=10)
    parser.add_argument("--max-windows", type=int, default=8, help="perplexity windows of 1024 tokens (agreement: half as many)")
    parser.add_argument("--workers", type=int, default=1, help="models evaluated at once (speed numbers are only comparable with 1)")
    parser.add_argument("--reference", help="teacher directory when it is not the first model (agreement, chat judge)")
    parser.add_argument("--output", required=True, help="report folder")
    parser.add_argument("--note", default="", help="what the rows should say about the conditions (machine, load)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from minigiant.evaluate import EvaluateConfig, evaluate_dirs
    from minigiant.evaluate.report import write_report

    models = {}
    for path in args.models:
        name = Path(path).name
        models[name.split("-", 1)[-1] if name[:2].isdigit() else name] = Path(path)
    chat = args.instructions != "none"
    config = EvaluateConfig(
        text=str(DATA / "text" / "wikitext2_raw_test.txt"), window=1024, max_windows=args.max_windows, agreement_windows=max(1, args.max_windows // 2) if len(models) > 1 or args.reference else 0,
        tasks=args.tasks, limit=args.limit or None, data_dir=str(DATA), batch_size=16,
        prompts=chat, instructions=args.instructions if chat else "builtin", max_instructions=args.max_instructions, max_new_tokens=64,
    )
    started = time.perf_counter()
    results = evaluate_dirs(models, config, Path(args.output) / "main", workers=args.workers, reference=args.reference)
    if args.gsm8k_limit:
        # GSM8K with its own limit; the cost columns come from the run above (speed test and chat skipped)
        gsm = EvaluateConfig(text=config.text, window=1024, max_windows=1, agreement_windows=0, speed_tokens=0, prompts=False,
                             tasks="gsm8k", limit=args.gsm8k_limit, data_dir=str(DATA), batch_size=16)
        for result, extra in zip(results, evaluate_dirs(models, gsm, Path(args.output) / "gsm8k", workers=args.workers, reference=args.reference)):
            result["tasks"].update(extra["tasks"])
    minutes = (time.perf_counter() - started) / 60
    write_report(results, args.output, f"minigiant evaluation: {args.label}")

    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows = [r for r in rows if r.get("label") != args.label]
    keep = ("params", "disk_bytes", "bits_per_weight", "perplexity", "peak_rss_mb", "ttft_s", "decode_tokens_per_s", "top1_agreement",
            "kl_teacher_student", "chat_judge_nll", "chat_judge_nll_fresh", "chat_repeat4_rate", "chat_empty_rate", "chat_truncated_rate")
    for r in results:
        rows.append({
            "label": args.label, "model": r["name"], "measured": when, "minutes_for_all_models": round(minutes, 1),
            "settings": {"limit": args.limit or "all", "gsm8k_limit": args.gsm8k_limit, "instructions": Path(args.instructions).name, "max_instructions": args.max_instructions,
                         "ppl_windows": args.max_windows, "threads": 1, "workers": args.workers, "note": args.note},
            **{k: r.get(k) for k in keep},
            "tasks": {t: {m: v for m, v in s["metrics"].items()} | {"samples": s["samples"], "num_fewshot": s["num_fewshot"]} for t, s in r["tasks"].items()},
        })
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(results)} models in {minutes:.1f} min; report: {Path(args.output) / 'report.md'}; rows: {RESULTS}")


if __name__ == "__main__":
    main()
