"""WikiText-2 perplexity and bits per weight of every quantization method at several widths, on a float
student (not the raw teacher: its weights already lie on a Q4_1 grid, which flatters any 4-bit method).

    PYTHONPATH=src python benchmarks/quantize_quality.py runs/baseline/02-distill

``runs/baseline/02-distill`` is the distilled student of ``minigiant run --output runs/baseline``. Every
row quantizes a fresh copy of it: the linear layers with the method at the given width (group 32,
asymmetric unless the format says otherwise), the tied embedding/head at 8 bits for all rows alike.
GPTQ, AWQ and mixed precision calibrate on the shipped corpus (corpus:train). Perplexity: 8 windows of
1,024 tokens of WikiText-2 raw test (``minigiant.evaluate.perplexity``). Rows go to
benchmarks/results/quantize.json (kind "quality"), written after each row so a long run can be watched.
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

ROWS = [
    # (name, QuantizeConfig settings), most important first: the 4-bit comparison is the goal
    ("rtn 4-bit", dict(method="rtn", bits=4)),
    ("gptq 4-bit", dict(method="gptq", bits=4)),
    ("awq 4-bit", dict(method="awq", bits=4)),
    ("awq 4-bit, gptq rounding (damping 0.1)", dict(method="awq", awq_rounding="gptq", damping=0.1, bits=4)),
    ("rtn 3-bit", dict(method="rtn", bits=3)),
    ("gptq 3-bit", dict(method="gptq", bits=3)),
    ("awq 3-bit", dict(method="awq", bits=3)),
    ("kmeans 4-bit (per-row codebook)", dict(method="kmeans", bits=4, group_size=-1)),
    ("ternary (2-bit codes)", dict(method="ternary", bits=2)),
    ("rtn 8-bit", dict(method="rtn", bits=8)),
    ("rtn q4_0", dict(method="rtn", format="q4_0")),
    ("gptq q4_0", dict(method="gptq", format="q4_0")),
    ("mixed rtn 3.5 bits/weight", dict(method="rtn", target_bits=3.5, bit_choices=[2, 3, 4, 5, 6, 8])),
    ("mixed rtn 3.75 bits/weight (uniform 3-bit's size)", dict(method="rtn", target_bits=3.75, bit_choices=[2, 3, 4, 5, 6, 8])),
    ("mixed rtn 4.25 bits/weight", dict(method="rtn", target_bits=4.25, bit_choices=[2, 3, 4, 5, 6, 8])),
    ("mixed gptq 4.25 bits/weight", dict(method="gptq", target_bits=4.25, bit_choices=[2, 3, 4, 5, 6, 8])),
    ("rtn 4-bit per channel", dict(method="rtn", bits=4, group_size=-1)),
    ("kmeans 3-bit (per-row codebook)", dict(method="kmeans", bits=3, group_size=-1)),
    ("gptq 8-bit", dict(method="gptq", bits=8)),
    ("awq 8-bit", dict(method="awq", bits=8)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a float student directory (e.g. runs/baseline/02-distill)")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--float-ppl", type=float, help="the float student's ppl from an earlier run of this script (skips measuring it again)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from minigiant import load
    from minigiant.artifact import lineage
    from minigiant.context import Context
    from minigiant.data.text import tokenize_documents
    from minigiant.evaluate.perplexity import perplexity
    from minigiant.quantize import QuantizeConfig, quantize

    model, tokenizer = load(args.student)
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text(encoding="utf-8")], max_tokens=8 * 1024)
    start = time.perf_counter()
    base = args.float_ppl or perplexity(model, ids, window=1024, max_windows=8)["ppl"]
    print(f"float32: ppl {base:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    common = {"student": args.student, "ppl_text": "wikitext2_raw_test.txt, 8 x 1024", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_rows([{"kind": "quality", "name": "float32", "ppl": round(base, 4), "ppl_change": 0.0, "bits_per_weight_linear": 32.0, **common}])

    for name, settings in ROWS:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        config = QuantizeConfig(group_size=settings.pop("group_size", 32), embedding_bits=8, ppl_text=None, calibration_tokens=args.calibration_tokens, **settings)
        q = quantize(copy.deepcopy(model), config, Context(tokenizer=tokenizer))
        seconds = time.perf_counter() - start
        ppl = perplexity(q, ids, window=1024, max_windows=8)["ppl"]
        metrics = lineage(q)["stages"][-1]["metrics"]
        row = {
            "kind": "quality", "name": name, "ppl": round(ppl, 4), "ppl_change": round(ppl - base, 4),
            "bits_per_weight_linear": metrics["linear_bits_per_weight"], "bits_per_weight_all": metrics["bits_per_weight"],
            "stored_mb": round(metrics["stored_bytes"] / 2**20, 2), "quantize_seconds": round(seconds, 1),
            "settings": {k: v for k, v in settings.items()}, **common,
        }
        print(f"{name}: ppl {ppl:.3f} (change {ppl - base:+.3f}), {row['bits_per_weight_linear']} bits/weight, {seconds:.0f} s", flush=True)
        write_rows([row])
        del q


if __name__ == "__main__":
    main()
