"""One-shot pruning of the default teacher, no healing: WikiText-2 perplexity (first 8 × 1024-token windows)
and seconds of each pruning method at 60% and 75% of the non-embedding parameters kept, and of unstructured
50% / 2:4 sparsity. Rows are appended to benchmarks/results/prune.json as they finish.

    PYTHONPATH=src .venv/bin/python benchmarks/prune_oneshot.py structured [--teacher DIR] [--blocks 32] [--block-size 512]
    PYTHONPATH=src .venv/bin/python benchmarks/prune_oneshot.py structured --only "linear patch"   # a subset of the rows
    PYTHONPATH=src .venv/bin/python benchmarks/prune_oneshot.py unstructured --blocks 16 [--only sequential] [--sparsity 0.7]
    PYTHONPATH=src .venv/bin/python benchmarks/prune_oneshot.py plot

Calibration: ``--blocks`` sequences × ``--block-size`` tokens of the shipped books (corpus:train, seed 0).
The one-shot width rows share one calibration pass over the teacher (its seconds are added to each of them;
``--cache`` keeps it on disk for a rerun); sequential and balanced rows run their own passes; depth rows use
the depth method's default calibration (16 × 256 tokens), as the default recipe does. The CPU was shared with
other jobs, so seconds are indicative only.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import minigiant
from minigiant.hardware import describe_cpu
from minigiant.data.text import tokenize_documents
from minigiant.evaluate.perplexity import perplexity
from minigiant.models.architecture import non_embedding_parameters
from minigiant.prune import PruneConfig
from minigiant.prune.verb import calibration_blocks, prune_in_steps, prune_structure, sparsify, sparsity_statistics, width_statistics
from shared_data import wikitext2_test, wikitext2_valid

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "prune.json"
TEACHER_PPL = 29.18

# (label, target, settings) in the order they run: the rows that decide the default recipe first.
STRUCTURED = [
    ("width mlp, lstsq", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq")),
    ("width mlp, obs + lstsq", 0.6, dict(structure="width", width_parts="mlp", importance="obs", reconstruct="lstsq")),
    ("width mlp+heads, obs + lstsq", 0.6, dict(structure="width", width_parts="mlp+heads", importance="obs", reconstruct="lstsq")),
    ("depth block_influence", 0.6, dict(structure="depth")),
    ("width mlp, none", 0.6, dict(structure="width", width_parts="mlp", reconstruct="none")),
    ("width mlp+heads, lstsq", 0.6, dict(structure="width", width_parts="mlp+heads", reconstruct="lstsq")),
    ("width mlp, lstsq, sequential", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq", sequential=True)),
    ("width mlp, bias", 0.6, dict(structure="width", width_parts="mlp", reconstruct="bias")),
    ("depth block_influence + linear patch", 0.6, dict(structure="depth", linear_patch=True)),
    ("width mlp+heads, none", 0.6, dict(structure="width", width_parts="mlp+heads", reconstruct="none")),
    ("balanced mlp, lstsq", 0.6, dict(structure="balanced", width_parts="mlp", reconstruct="lstsq")),
    ("width mlp, lstsq, 2 steps", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq", steps=2)),
    ("depth block_influence, 3 steps", 0.6, dict(structure="depth", steps=3)),
    # the refit's ridge (damp; 0.01 until 2026-12-02, when these rows measured it too strong)
    *[(f"width mlp, lstsq, damp {d}", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq", damp=d)) for d in (0.0001, 0.001, 0.03)],
    # the neuron score under the same refit (activation is the default; obs is above)
    *[(f"width mlp, {score} + lstsq", 0.6, dict(structure="width", width_parts="mlp", importance=score, reconstruct="lstsq"))
      for score in ("magnitude_l2", "wanda", "fluctuation", "taylor")],
    # the calibration text's domain: WikiText-2's validation split (the tokenized release, <unk> included),
    # a different split of the same source as the evaluation text
    ("width mlp, lstsq, calibrated on WikiText-2 valid", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq",
                                                                   calibration_text="wikitext2_valid")),
    # per-layer widths at the same size, spread by each layer's measured KL (width_profile, 2026-12-04)
    ("width mlp, lstsq, sensitivity profile", 0.6, dict(structure="width", width_parts="mlp", reconstruct="lstsq", width_profile="sensitivity")),
    ("width mlp, lstsq", 0.75, dict(structure="width", width_parts="mlp", reconstruct="lstsq")),
    ("width mlp, obs + lstsq", 0.75, dict(structure="width", width_parts="mlp", importance="obs", reconstruct="lstsq")),
    ("depth block_influence", 0.75, dict(structure="depth")),
    ("width mlp, none", 0.75, dict(structure="width", width_parts="mlp", reconstruct="none")),
    ("width mlp+heads, lstsq", 0.75, dict(structure="width", width_parts="mlp+heads", reconstruct="lstsq")),
    ("depth block_influence + linear patch", 0.75, dict(structure="depth", linear_patch=True)),
    ("width mlp, lstsq, sequential", 0.75, dict(structure="width", width_parts="mlp", reconstruct="lstsq", sequential=True)),
]
# (method, N:M, sequential, sparsity profile); sequential: each layer calibrated on the sparse prefix
UNSTRUCTURED = [(method, nm, False, "uniform") for nm in (None, "2:4") for method in ("magnitude", "wanda", "sparsegpt")] + [
    (method, nm, True, "uniform") for nm in (None, "2:4") for method in ("wanda", "sparsegpt")] + [
    ("wanda", None, False, "owl"), ("sparsegpt", None, True, "owl")]  # OWL: more weights kept where outliers are


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=["structured", "unstructured", "plot"], help="plot: draw prune.png and print the markdown table")
    parser.add_argument("--teacher", default="default", help="teacher model (a float32 copy of it loads faster than the GGUF)")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--only", help="run only the rows whose label contains this text")
    parser.add_argument("--targets", help="run only the structured rows with these kept fractions, e.g. 0.6")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured rows: the sparsity (N:M rows run at 0.5 only)")
    parser.add_argument("--cache", help="file to keep the shared width calibration statistics in")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job holds a core: perplexity is unaffected, seconds are)")
    args = parser.parse_args()
    if args.family == "plot":
        return plot()
    torch.set_num_threads(args.threads)
    teacher, tokenizer = minigiant.load(args.teacher)
    ids = tokenize_documents(tokenizer, [wikitext2_test().read_text()], max_tokens=8 * 1024 + 1)
    base = dict(calibration_blocks=args.blocks, block_size=args.block_size, batch_size=4)
    before = non_embedding_parameters(teacher)

    def record(method, target, model, seconds, extra=None):
        ppl = perplexity(model, ids)["ppl"]
        row = {"family": args.family, "method": method, "target": target, "kept_fraction": round(non_embedding_parameters(model) / before, 4),
               "ppl": round(ppl, 2), "seconds": round(seconds, 1), "calibration": f"{args.blocks}x{args.block_size}", **(extra or {}),
               "date": time.strftime("%Y-%m-%d"), "isa": describe_cpu()["isa"], "threads": args.threads}
        print(json.dumps(row), flush=True)
        rows = json.loads(OUT.read_text()) if OUT.exists() else []  # two families may run at once: re-read

        def key(r):
            return r.get("method"), r.get("target"), r.get("calibration")

        rows = [r for r in rows if key(r) != key(row)] + [row]
        OUT.write_text(json.dumps(rows, indent=1) + "\n")

    RESULTS.mkdir(exist_ok=True)
    if args.family == "structured":
        stats, calibration_seconds = None, 0.0
        for label, target, settings in STRUCTURED:
            if (args.only and args.only not in label) or (args.targets and target not in [float(t) for t in args.targets.split(",")]):
                continue
            if settings.get("calibration_text") == "wikitext2_valid":
                settings = settings | {"calibration_text": str(wikitext2_valid())}
            config = PruneConfig(target=target, **settings, **(base if settings["structure"] != "depth" else {}))
            # one calibration pass (books, activation statistics) serves the plain one-shot width rows
            shared = (settings["structure"] == "width" and not settings.get("sequential") and settings.get("steps", 1) == 1
                      and settings.get("importance") != "taylor" and "calibration_text" not in settings)
            if shared and stats is None:
                start = time.perf_counter()
                if args.cache and Path(args.cache).exists():
                    stats = torch.load(args.cache, weights_only=False)
                else:
                    stats = width_statistics(teacher, PruneConfig(width_parts="mlp+heads", **base), calibration_blocks(tokenizer, PruneConfig(**base), 0))
                    if args.cache:
                        torch.save(stats, args.cache)
                calibration_seconds = time.perf_counter() - start
            model = copy.deepcopy(teacher)
            start = time.perf_counter()
            metrics = prune_in_steps(model, config, tokenizer, 0) if config.steps > 1 else prune_structure(model, config, tokenizer, 0, stats=stats if shared else None)
            seconds = time.perf_counter() - start + (calibration_seconds if shared else 0)
            keys = ("mlp_error_dropped_mean", "mlp_error_mean", "attn_error_dropped_mean", "attn_error_mean", "intermediate_size", "num_attention_heads", "mlp_widths")
            extra = {k: metrics[k] for k in keys if k in metrics} | {"layers": model.config.num_hidden_layers}
            if settings["structure"] == "depth":
                extra["calibration"] = "16x256"
            record(label, target, model, seconds, extra)
            del model
        if not args.only:
            record("teacher", 1.0, teacher, 0.0)
    else:
        stats, calibration_seconds = None, 0.0
        for method, nm, sequential, profile in UNSTRUCTURED:
            if nm and args.sparsity != 0.5:
                continue
            label = f"{method} {nm or f'{args.sparsity:.0%}'}" + (", sequential" if sequential else "") + (", owl" if profile == "owl" else "")
            if args.only and args.only not in label:
                continue
            config = PruneConfig(structure="unstructured", sparsity_method=method, sparsity=args.sparsity, nm=nm, sequential=sequential,
                                 sparsity_profile=profile, **base)
            shared = method != "magnitude" and not sequential  # one one-shot calibration pass serves these rows
            if shared and stats is None:
                start = time.perf_counter()
                stats = sparsity_statistics(teacher, config, calibration_blocks(tokenizer, config, 0))
                calibration_seconds = time.perf_counter() - start
            model = copy.deepcopy(teacher)
            start = time.perf_counter()
            metrics = sparsify(model, config, tokenizer, 0, stats=stats if shared else None)
            seconds = time.perf_counter() - start + (calibration_seconds if shared else 0)
            extra = {k: metrics[k] for k in ("sparsity", "layer_sparsity") if k in metrics}
            record(label, round(1 - args.sparsity, 4), model, seconds, extra)
            del model


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(OUT.read_text())
    # The teacher's ppl under the same protocol was measured by benchmarks/default_run.py (29.18) when no run
    # of this script got as far as its own teacher row.
    teacher = next((r["ppl"] for r in rows if r["method"] == "teacher"), TEACHER_PPL)
    fig, ax = plt.subplots(figsize=(8, 5))
    for family, marker in (("structured", "o"), ("unstructured", "s")):
        for r in rows:
            if r["family"] == family and r["method"] != "teacher":
                x = r["kept_fraction"] if family == "structured" else 1 - r.get("sparsity", 0.5)
                ax.scatter(x, r["ppl"], marker=marker)
                ax.annotate(f"{r['method']}", (x, r["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(teacher, color="gray", linestyle="--", label=f"teacher {teacher}")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of non-embedding parameters (unstructured: density)")
    ax.set_ylabel("WikiText-2 ppl, no healing (log)")
    ax.set_title("One-shot pruning of SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "prune.png", dpi=120)
    print("| method | kept (non-embedding) | WikiText-2 ppl | × teacher | seconds | output error dropped → refit (MLP / attn) | shape |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["family"] != "reference" and r["method"] != "teacher", r["family"], -r["target"], r["ppl"])):
        errors = " / ".join(f"{r[k + '_error_dropped_mean']:.3f} → {r[k + '_error_mean']:.3f}" for k in ("mlp", "attn") if k + "_error_mean" in r)
        shape = f"{r['layers']} layers, ffn {r.get('intermediate_size', 1536)}, {r.get('num_attention_heads', 9)} heads" if "layers" in r else (f"sparsity {r['sparsity']}" if "sparsity" in r else "")
        kept = f"{r['kept_fraction']:.3f}" if r["family"] != "unstructured" else f"{1 - r['sparsity']:.3f} density"
        print(f"| {r['method']} | {kept} | {r['ppl']:,.1f} | {r['ppl'] / teacher:.2f} | {r['seconds']:.0f} | {errors} | {shape} |")


if __name__ == "__main__":
    main()
