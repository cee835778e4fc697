"""Decode speed of quantized students against their float student, in one run (batch 1, 2 threads).

    PYTHONPATH=src python benchmarks/quantize_speed.py runs/baseline/02-distill

Each quantized copy of the student is timed under every runtime that fits it (``kernels.runtime``: the
CPU int4/int8 kernels, a dequantized cached copy, and dequantize-per-call) and the float student in
float32 and bfloat16. Rounds are interleaved (every configuration once per round) and the median
tokens/s per configuration is divided by the float32 student's median: on a shared CPU only such
same-run ratios mean anything. Rows go to benchmarks/results/quantize.json (kind "decode").

``--nll-tokens N`` also feeds the first N WikiText-2 tokens one at a time through each configuration (KV
cache, as decode runs) and records the perplexity of that path: the kernels' numerics (bf16 activations,
int8dynamic's 7-bit activations) act only in decode, which a prefill perplexity does not see.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import wikitext2_test  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"


def write_rows(rows: list[dict]) -> None:
    """Replace the rows of the same kind, name, CPU ISA and student; keep the rest (other machines' and
    students' rows too)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []

    def key(r):
        return r["kind"], r["name"], r.get("isa"), r.get("student")

    keys = {key(r) for r in rows}
    RESULTS.write_text(json.dumps([r for r in old if key(r) not in keys] + rows, indent=1) + "\n")


@torch.no_grad()
def decode_path_perplexity(model, ids: torch.Tensor) -> float:
    """Perplexity of ``ids[1:]`` with the tokens fed one at a time through a KV cache (the decode path)."""
    from transformers import DynamicCache

    from minigiant.generate import cache_keyword

    cache, keyword = DynamicCache(config=model.config), cache_keyword(model)
    nll = 0.0
    for i in range(len(ids) - 1):
        logits = model(ids[i : i + 1].reshape(1, 1), use_cache=True, **{keyword: cache}).logits[0, -1].float()
        nll -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
    return float(torch.tensor(nll / (len(ids) - 1)).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a float student directory (e.g. runs/baseline/02-distill)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--nll-tokens", type=int, default=0, help="also measure the decode path's perplexity on this many tokens (0: skip)")
    parser.add_argument("--only", action="append", default=[], help="measure only the quantized students whose name contains this (repeatable); float32 always runs as the baseline")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from minigiant import load
    from minigiant.evaluate.efficiency import decode_speed
    from minigiant.quantize import QuantizeConfig, quantize
    from minigiant.quantize.kernels import best_kind, runtime
    from minigiant.quantize.modules import QuantLinear

    model, tokenizer = load(args.student)
    text = wikitext2_test().read_text(encoding="utf-8")[:20_000]
    prompt = torch.tensor(tokenizer(text)["input_ids"][: args.prompt_tokens])

    def wanted(name: str) -> bool:
        return not args.only or any(o in name for o in args.only)

    students = {
        "float32": (model, ["auto"]),
    }
    if wanted("bfloat16"):
        students["bfloat16"] = (copy.deepcopy(model).to(torch.bfloat16), ["auto"])
    for name, config, kinds in (
        ("int8 g32", QuantizeConfig(bits=8, group_size=32, ppl_text=None), ["auto"]),
        ("int8 per-channel", QuantizeConfig(bits=8, group_size=-1, ppl_text=None), ["auto", "int8pack", "int8dynamic"]),
        ("int4 g32", QuantizeConfig(bits=4, group_size=32, ppl_text=None), ["auto", "cached", "per-call"]),
        ("int4 g32, per-channel int8 head", QuantizeConfig(bits=4, group_size=32, embedding_group_size=-1, ppl_text=None), ["auto"]),
    ):
        if not wanted(name):
            continue
        q = quantize(copy.deepcopy(model), config)
        print(name, "linear runtimes:", sorted({best_kind(m) for m in q.modules() if isinstance(m, QuantLinear)}), file=sys.stderr)
        students[name] = (q, kinds)

    timings: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, (m, kinds) in students.items():
            for kind in kinds:
                with runtime(kind):
                    speed = decode_speed(m, prompt, args.new_tokens)["decode_tokens_per_s"]
                timings.setdefault(f"{name} | {kind}", []).append(speed)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    decode_ppl = {}
    if args.nll_tokens:
        ids = torch.tensor(tokenizer(text)["input_ids"][: args.nll_tokens + 1])
        for name, (m, kinds) in students.items():
            for kind in kinds:
                with runtime(kind):
                    decode_ppl[f"{name} | {kind}"] = decode_path_perplexity(m, ids)
                print(f"{name} | {kind}: decode-path ppl {decode_ppl[f'{name} | {kind}']:.3f}", file=sys.stderr)

    from minigiant.hardware import describe_cpu

    machine = describe_cpu()
    base = statistics.median(timings["float32 | auto"])
    rows = []
    print(f"{'student | runtime':40s} {'tok/s':>8s} {'vs float32':>10s} {'decode-path ppl':>16s}")
    for key, values in timings.items():
        median = statistics.median(values)
        print(f"{key:40s} {median:8.1f} {median / base:10.2f} {decode_ppl.get(key, float('nan')):16.3f}")
        rows.append({
            "kind": "decode", "name": key, "decode_tokens_per_s_median": round(median, 2),
            "ratio_vs_float32": round(median / base, 3), "rounds": args.rounds, "new_tokens": args.new_tokens,
            "threads": 2, "student": args.student, **({"decode_path_ppl": round(decode_ppl[key], 3), "decode_path_tokens": args.nll_tokens} if key in decode_ppl else {}), "note": "shared CPU: compare ratios within this run only",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **machine,
        })
    write_rows(rows)


if __name__ == "__main__":
    main()
