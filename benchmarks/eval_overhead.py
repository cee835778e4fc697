"""lm-eval's overhead over the raw forward passes it needs, and the batch size to use.

Scores arc_easy (first N questions, 4 choices each) on the teacher through lm-eval at several batch sizes,
and times the bare forward passes of the same (context + choice) sequences one at a time. Appends a row
to benchmarks/results/evaluate.json.

    python benchmarks/eval_overhead.py runs/baseline/00-teacher --limit 40 --batch-sizes 1,4,16
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
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-sizes", default="1,4,16")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from minigiant.evaluate.harness import evaluate_tasks, resolve_tasks
    from minigiant.models.loading import load

    model, tokenizer = load(args.model)
    specs = resolve_tasks(["arc_easy"], DATA)
    rows = [json.loads(line) for line in open(DATA / "arc_easy" / "dev.jsonl")][: args.limit]
    sequences = [tokenizer(r["query"] + "\nAnswer: " + c, return_tensors="pt")["input_ids"] for r in rows for c in r["choices"]]
    timings = {}
    with torch.inference_mode():
        model(sequences[0])  # warm-up
        start = time.perf_counter()
        for ids in sequences:
            model(ids).logits.log_softmax(-1)
        timings["raw_forward_batch1_s"] = time.perf_counter() - start
    accuracies = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        start = time.perf_counter()
        result = evaluate_tasks(model, tokenizer, specs, limit=args.limit, batch_size=batch)["arc_easy"]
        timings[f"lm_eval_batch{batch}_s"] = time.perf_counter() - start
        accuracies[batch] = result["metrics"]["acc"]["value"]
    row = {
        "label": "lm-eval-overhead", "model": Path(args.model).name, "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "requests": len(sequences), **{k: round(v, 1) for k, v in timings.items()}, "acc_by_batch": accuracies,
        "note": "1 thread on a shared 2-core CPU with other jobs running: compare ratios within this row only",
    }
    print(json.dumps(row, indent=1))
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    data = [r for r in data if r.get("label") != row["label"]] + [row]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
