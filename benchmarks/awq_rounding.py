"""What rounds AWQ's scaled weights (``awq_rounding``: rtn or gptq, and GPTQ's ``damping``), with the default
recipe's int4 settings (group 32, asymmetric, tied embedding int8 per row, 16,384 calibration tokens of the
shipped books), on float students: WikiText-2 raw test, first 8 × 1024-token windows.

    PYTHONPATH=src .venv/bin/python benchmarks/awq_rounding.py runs/default/02-distill [more students] [--kind gptq_damping]

Rows go to benchmarks/results/quantize.json (kind "awq_rounding", or "gptq_damping" for GPTQ alone).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_speed import write_rows  # noqa: E402
from shared_data import wikitext2_test  # noqa: E402

# name -> (row kind, QuantizeConfig settings)
VARIANTS = {
    "awq, rtn rounding": ("awq_rounding", dict(method="awq", awq_rounding="rtn")),
    "awq, gptq rounding, damping 0.01": ("awq_rounding", dict(method="awq", awq_rounding="gptq", damping=0.01)),
    "awq, gptq rounding, damping 0.1": ("awq_rounding", dict(method="awq", awq_rounding="gptq", damping=0.1)),
    # GPTQ alone: is its default damping (0.01, the paper's 1%) also worse than 0.1 on distilled students?
    "gptq, damping 0.01": ("gptq_damping", dict(method="gptq", damping=0.01)),
    "gptq, damping 0.1": ("gptq_damping", dict(method="gptq", damping=0.1)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", help="float student directories")
    parser.add_argument("--kind", choices=sorted({kind for kind, _ in VARIANTS.values()}), help="run only the variants of this kind")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from minigiant import load
    from minigiant.context import Context
    from minigiant.data.text import tokenize_documents
    from minigiant.evaluate.perplexity import perplexity
    from minigiant.quantize import QuantizeConfig, quantize

    for student in args.students:
        model, tokenizer = load(student)
        ids = tokenize_documents(tokenizer, [wikitext2_test().read_text(encoding="utf-8")], max_tokens=8 * 1024)
        base = perplexity(model, ids, window=1024, max_windows=8)["ppl"]
        print(f"{student}: float {base:.3f}", flush=True)
        for name, (kind, settings) in VARIANTS.items():
            if args.kind and kind != args.kind:
                continue
            start = time.perf_counter()
            config = QuantizeConfig(bits=4, group_size=32, embedding_bits=8, embedding_group_size=-1, ppl_text=None, **settings)
            q = quantize(copy.deepcopy(model), config, Context(tokenizer=tokenizer))
            seconds = time.perf_counter() - start
            ppl = perplexity(q, ids, window=1024, max_windows=8)["ppl"]
            print(f"  {name}: {ppl:.3f} ({ppl - base:+.3f}), {seconds:.0f} s", flush=True)
            write_rows([{"kind": kind, "student": student, "name": name, "settings": settings, "float_ppl": round(base, 4),
                         "ppl": round(ppl, 4), "ppl_change": round(ppl - base, 4), "quantize_seconds": round(seconds, 1),
                         "ppl_text": "wikitext2_raw_test.txt, 8 x 1024", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}])
            del q


if __name__ == "__main__":
    main()
