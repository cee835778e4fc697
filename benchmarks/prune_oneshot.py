"""One-shot pruning of the default teacher, no healing: WikiText-2 perplexity (first 8 × 1024-token windows)
and seconds of every pruning method at 75% and 60% of the non-embedding parameters kept, plus unstructured
50% and 2:4 sparsity. Rows go to benchmarks/results/prune.json, a plot to benchmarks/results/prune.png.

    PYTHONPATH=src .venv/bin/python benchmarks/prune_oneshot.py [--teacher DIR] [--blocks 64] [--block-size 512] [--only structured|unstructured]

Calibration: ``--blocks`` sequences × ``--block-size`` tokens of the shipped books (corpus:train). One
calibration pass over the unpruned teacher is shared by the width rows (its seconds are added to each row's
own seconds); depth and balanced rows calibrate themselves. The CPU is shared with other work, so the
seconds are indicative only.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import minigiant
from minigiant.data.text import tokenize_documents
from minigiant.evaluate.perplexity import perplexity
from minigiant.models.architecture import non_embedding_parameters
from minigiant.prune import PruneConfig
from minigiant.prune.verb import calibration_blocks, prune_structure, sparsify, sparsity_statistics, width_statistics
from shared_data import wikitext2_test

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="default", help="teacher model (a float32 copy loads faster than the GGUF)")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--only", choices=["structured", "unstructured"])
    parser.add_argument("--targets", default="0.75,0.6")
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher, tokenizer = minigiant.load(args.teacher)
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    base = dict(calibration_blocks=args.blocks, block_size=args.block_size, batch_size=4)
    rows = []
    out = RESULTS / "prune.json"
    if out.exists():
        rows = [r for r in json.loads(out.read_text()) if not (args.only and r["family"] == args.only) and args.only]
    before = non_embedding_parameters(teacher)

    def record(family, method, target, model, seconds, extra=None):
        ppl = perplexity(model, ids)["ppl"]
        row = {"family": family, "method": method, "target": target, "kept_fraction": round(non_embedding_parameters(model) / before, 4),
               "ppl": round(ppl, 2), "seconds": round(seconds, 1), **(extra or {})}
        print(json.dumps(row), flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))

    if not any(r["method"] == "teacher" for r in rows):
        record("reference", "teacher", 1.0, teacher, 0.0)
    if args.only != "unstructured":
        start = time.perf_counter()
        blocks = calibration_blocks(tokenizer, PruneConfig(**base), 0)
        stats = width_statistics(teacher, PruneConfig(width_parts="mlp+heads", **base), blocks)
        calibration_seconds = time.perf_counter() - start
        print(f"width calibration: {calibration_seconds:.0f} s", flush=True)
        for target in [float(t) for t in args.targets.split(",")]:
            for name, settings in [
                ("depth block_influence", dict(structure="depth")),
                ("width mlp", dict(structure="width", width_parts="mlp")),
                ("width mlp+heads", dict(structure="width", width_parts="mlp+heads")),
                ("balanced mlp+heads", dict(structure="balanced", width_parts="mlp+heads")),
            ]:
                for reconstruct in (["none"] if settings["structure"] == "depth" else ["none", "bias", "lstsq"]):
                    config = PruneConfig(target=target, reconstruct=reconstruct, **settings, **base)
                    model = copy.deepcopy(teacher)
                    start = time.perf_counter()
                    shared = stats if settings["structure"] == "width" else None
                    metrics = prune_structure(model, config, tokenizer, 0, stats=shared)
                    seconds = time.perf_counter() - start + (calibration_seconds if shared else 0)
                    extra = {"reconstruct": reconstruct, **{k: metrics[k] for k in ("mlp_error_dropped_mean", "mlp_error_mean", "attn_error_dropped_mean", "attn_error_mean", "intermediate_size", "num_attention_heads") if k in metrics},
                             "layers": model.config.num_hidden_layers}
                    record("structured", name, target, model, seconds, extra)
                    del model
    if args.only != "structured":
        start = time.perf_counter()
        config = PruneConfig(structure="unstructured", **base)
        stats = sparsity_statistics(teacher, config, calibration_blocks(tokenizer, config, 0))
        calibration_seconds = time.perf_counter() - start
        for nm in (None, "2:4"):
            for method in ("magnitude", "wanda", "sparsegpt"):
                config = PruneConfig(structure="unstructured", sparsity_method=method, sparsity=0.5, nm=nm, **base)
                model = copy.deepcopy(teacher)
                start = time.perf_counter()
                metrics = sparsify(model, config, tokenizer, 0, stats=None if method == "magnitude" else stats)
                seconds = time.perf_counter() - start + (0 if method == "magnitude" else calibration_seconds)
                record("unstructured", f"{method} {nm or '50%'}", 0.5, model, seconds, {"sparsity": metrics["sparsity"]})
                del model


if __name__ == "__main__":
    main()
