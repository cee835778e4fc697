"""Is a pruned and distilled student worth more than its teacher quantized to the same size? The teacher quantized
with the default recipe's int4 method (AWQ scales, GPTQ rounding, damping 0.1, tied embedding int8 per row) at
fewer bits, against the default run's quantized students: bytes on disk, WikiText-2 perplexity (raw test, first
8 × 1024-token windows) and greedy decode speed (64 tokens after a chat prompt, 2 threads; the models interleaved
over 3 rounds, medians, as a ratio to the float teacher in the same run).

    PYTHONPATH=src .venv/bin/python benchmarks/equal_size.py runs/dr-final/04-int4 runs/dr-t72/04-int4

Rows go to benchmarks/results/quantize.json (kind "equal_size"). The teacher's own 4-bit grid is artificially
lossless (its weights were Q4_1 before they were dequantized), which is why its 3- and 2-bit grids are the test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_speed import write_rows  # noqa: E402
from shared_data import wikitext2_test  # noqa: E402

TEACHER_GRIDS = {  # name -> QuantizeConfig settings on top of the default int4's
    "teacher int4 g32": dict(bits=4, group_size=32),
    "teacher int3 g32": dict(bits=3, group_size=32),
    "teacher int3 g64": dict(bits=3, group_size=64),
    "teacher int2 g32": dict(bits=2, group_size=32),
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def decode_seconds(model, ids: list[int], tokens: int = 64) -> float:
    from minigiant.generate import decode_steps

    start = time.perf_counter()
    for _ in decode_steps(model, [ids], 0, set(), tokens, 0.0, 0):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", help="quantized student directories")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from minigiant import artifact, load
    from minigiant.context import Context
    from minigiant.data.text import tokenize_documents
    from minigiant.evaluate.perplexity import perplexity
    from minigiant.quantize import QuantizeConfig, quantize

    teacher, tokenizer = load("default")
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text(encoding="utf-8")], max_tokens=8 * 1024)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Explain in three sentences why the sky is blue."}], add_generation_prompt=True, return_dict=True)["input_ids"]
    models, rows = {"teacher float32": teacher}, {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["teacher float32"] = {"bytes": folder_bytes(artifact.save(teacher, tokenizer, Path(tmp) / "teacher"))}
        for name, grid in TEACHER_GRIDS.items():
            start = time.perf_counter()
            config = QuantizeConfig(method="awq", awq_rounding="gptq", damping=0.1, embedding_bits=8, embedding_group_size=-1, ppl_text=None, **grid)
            q = quantize(copy.deepcopy(teacher), config, Context(tokenizer=tokenizer))
            rows[name] = {"bytes": folder_bytes(artifact.save(q, tokenizer, Path(tmp) / name.replace(" ", "-"))), "settings": grid,
                          "quantize_seconds": round(time.perf_counter() - start, 1)}
            models[name] = q
            print(f"{name}: quantized in {rows[name]['quantize_seconds']} s", flush=True)
    for student in args.students:
        models[student], _ = load(student)
        rows[student] = {"bytes": folder_bytes(Path(student))}
    for name, model in models.items():
        rows[name]["ppl"] = round(perplexity(model, ids, window=1024, max_windows=8)["ppl"], 3)
        print(f"{name}: {rows[name]['bytes'] / 1e6:.1f} MB, WikiText-2 {rows[name]['ppl']}", flush=True)
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        decode_seconds(model, prompt, 8)
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt))
    base = statistics.median(times["teacher float32"])
    out = []
    for name, row in rows.items():
        seconds = statistics.median(times[name])
        row.update({"kind": "equal_size", "name": name, "student": name, "decode_tokens_per_s": round(64 / seconds, 2),
                    "decode_vs_teacher_float": round(base / seconds, 3), "ratio_to_teacher": round(row["ppl"] / rows["teacher float32"]["ppl"], 3),
                    "ppl_text": "wikitext2_raw_test.txt, 8 x 1024", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        out.append(row)
        print(f"| {name} | {row['bytes'] / 1e6:.1f} MB | {row['ppl']:.2f} ({row['ratio_to_teacher']:.2f}×) | {row['decode_tokens_per_s']:.1f} tok/s ({row['decode_vs_teacher_float']:.2f}×) |", flush=True)
    write_rows(out)


if __name__ == "__main__":
    main()
