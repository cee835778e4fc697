"""Compare distillation settings at a fixed token budget: prune the default teacher (block influence, 60%),
distill with the given settings, report WikiText-2 perplexity (first 8 × 1024-token windows).

    .venv/bin/python benchmarks/distill_settings.py '{"max_steps": 30, "lr": 4e-4, "temperature": 1.0}'

Used to choose the default recipe's temperature and learning rate; results are in BENCHMARKS.md.
Run it alone: it takes ~5 minutes on 2 cores.
"""

from __future__ import annotations

import copy
import json
import sys

import minigiant
from minigiant.data.text import tokenize_documents
from minigiant.evaluate.perplexity import perplexity
from shared_data import wikitext2_test



def main() -> None:
    settings = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    teacher, tokenizer = minigiant.load("default")
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    ctx = minigiant.Context(tokenizer=tokenizer, teacher=teacher)
    student = minigiant.prune(copy.deepcopy(teacher), minigiant.PruneConfig(), ctx)
    pruned_ppl = perplexity(student, ids)["ppl"]
    minigiant.distill(student, minigiant.DistillConfig(**settings), ctx)
    metrics = minigiant.artifact.lineage(student)["stages"][-1]["metrics"]
    print(json.dumps({
        "settings": settings, "pruned_ppl": round(pruned_ppl, 2), "distilled_ppl": round(perplexity(student, ids)["ppl"], 2),
        "tokens": metrics["tokens"], "seconds": metrics["seconds"], "final_loss": metrics["final_loss"],
    }))


if __name__ == "__main__":
    main()
