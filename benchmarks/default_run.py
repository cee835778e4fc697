"""Run the default recipe and record teacher-vs-student numbers in BENCHMARKS.md.

    .venv/bin/python benchmarks/default_run.py [--minutes 20] [--output runs/bench-default]

Perplexity is measured on the first 8 non-overlapping 1024-token windows of WikiText-2 raw test
(``$MINIGIANT_DATA/text/wikitext2_raw_test.txt``, default ``../shared/data``), a text none of the models
trained on. Speeds are ratios within this run (the machine is shared and noisy): run it alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from shared_data import wikitext2_test

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Default recipe (`minigiant run`)"


def fmt_row(r: dict, ref: dict) -> str:
    def ratio(key, digits=2):
        return f"{r[key] / ref[key]:.{digits}f}×" if r.get(key) and ref.get(key) else "–"

    return (
        f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['non_embedding_params'] / 1e6:.1f}M ({ratio('non_embedding_params')}) "
        f"| {r['disk_bytes'] / 2**20:.1f} ({ratio('disk_bytes')}) | {r['perplexity']:.2f} ({ratio('perplexity')}) "
        f"| {r['peak_rss_mb']:.0f} | {r['decode_tokens_per_s']:.1f} ({ratio('decode_tokens_per_s')}) |"
    )


def pruned_shape(metrics: dict) -> str:
    """What the prune stage removed, from its metrics: layers (depth) or width (MLP neurons, heads)."""
    parts = []
    if metrics.get("removed_layers"):
        parts.append(f"removed layers {metrics['removed_layers']}")
    if metrics.get("intermediate_size"):
        parts.append(f"narrowed the MLPs to {metrics['intermediate_size']} neurons and kept {metrics['num_attention_heads']} query heads")
    return " and ".join(parts) or "removed nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="passed to `minigiant run --minutes`")
    parser.add_argument("--output", default="runs/bench-default", help="run directory, relative to the repo root")
    args = parser.parse_args()
    os.chdir(ROOT)  # every path in the recorded command is relative to the repo root
    wikitext = os.path.relpath(wikitext2_test(), ROOT)

    from minigiant.cli import main as cli

    argv = ["run", "--output", args.output, "--set", f"stages.4.text={wikitext}"]
    if args.minutes:
        argv += ["--minutes", str(args.minutes)]
    command = "minigiant " + " ".join(argv)
    started = time.perf_counter()
    code = cli(argv)
    minutes = (time.perf_counter() - started) / 60
    if code:
        sys.exit(code)

    out = Path(args.output)
    report = json.loads((out / "report.json").read_text())
    results = {r["name"]: r for r in report["models"]}
    teacher = results["teacher"]
    distill = json.loads((out / "02-distill" / "minigiant.json").read_text())["stages"][-1]["metrics"]
    prune = json.loads((out / "01-prune" / "minigiant.json").read_text())["stages"][-1]["metrics"]
    lines = [
        SECTION,
        "",
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), torch CPU, float32; "
        f"the whole run took {minutes:.1f} min (stages reused from an earlier run would make this shorter: delete the output first).",
        "",
        f"Command: `python benchmarks/default_run.py{' --minutes ' + str(args.minutes) if args.minutes else ''}` (runs `{command}`).",
        "Perplexity: first 8 non-overlapping 1024-token windows of WikiText-2 raw test. "
        "Ratios are against the teacher in the same run; tok/s is greedy decode after a 128-token prompt.",
        "",
        "| model | params | non-embedding params | disk MB | WikiText-2 ppl | peak RSS MB | decode tok/s |",
        "|---|---|---|---|---|---|---|",
        *[fmt_row(r, teacher) for r in report["models"]],
        "",
        f"Pruning {pruned_shape(prune)} (kept {prune['kept_fraction']:.4f} of the non-embedding parameters). "
        f"Distillation: {distill['steps']} steps, {distill['tokens']:,} tokens in {distill['seconds'] / 60:.1f} min "
        f"(loss {distill['first_loss']:.3f} → {distill['final_loss']:.3f}, stopped by {distill['stopped_by']}).",
        "",
    ]
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text() if bench.exists() else "# Benchmarks\n\nEvery number here was measured by a script in `benchmarks/`; the command is given with it.\n\n"
    if SECTION in text:  # replace our section, keep the others
        start = text.index(SECTION)
        end = text.find("\n## ", start + 1)
        text = text[:start] + text[end + 1 if end != -1 else len(text):]
    bench.write_text(text.rstrip() + "\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
