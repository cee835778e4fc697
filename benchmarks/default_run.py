"""Run the default recipe and record teacher-vs-student numbers in BENCHMARKS.md (a new dated subsection at the
top of its section, earlier runs kept below) and in benchmarks/results/default_run.json (one entry per run,
with the machine it ran on).

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
import shlex
import sys
import time
from pathlib import Path

from shared_data import wikitext2_test

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Default recipe (`minigiant run`)"


def fmt_row(r: dict, ref: dict) -> str:
    def ratio(key, digits=2):
        return f"{r[key] / ref[key]:.{digits}f}×" if r.get(key) and ref.get(key) else "–"

    def value(key, form):
        return form.format(r[key]) if r.get(key) is not None else "–"

    return (
        f"| {r['name']} | {r['non_embedding_params'] / 1e6:.1f}M ({ratio('non_embedding_params')}) "
        f"| {r['disk_bytes'] / 2**20:.1f} ({ratio('disk_bytes')}) | {r['perplexity']:.2f} ({ratio('perplexity')}) "
        f"| {value('top1_agreement', '{:.1%}')} | {value('chat_repeat4_rate', '{:.2f}')} | {value('chat_judge_nll', '{:.2f}')}{value('chat_judge_nll_stderr', ' ± {:.2f}') if r.get('chat_judge_nll_stderr') is not None else ''} "
        f"| {r['peak_rss_mb']:.0f} | {r['decode_tokens_per_s']:.1f} ({ratio('decode_tokens_per_s')}) |"
    )


def pruned_shape(metrics: dict) -> str:
    """What the prune stage removed, from its metrics: layers (depth) or width (MLP neurons, heads)."""
    parts = []
    if metrics.get("removed_layers"):
        parts.append(f"removed layers {metrics['removed_layers']}")
    if metrics.get("mlp_widths"):  # width_profile: sensitivity
        widths = metrics["mlp_widths"]
        parts.append(f"narrowed the MLPs to {min(widths)}-{max(widths)} neurons by layer ({sum(widths) // len(widths)} on average) and kept {metrics['num_attention_heads']} query heads")
    elif metrics.get("intermediate_size"):
        parts.append(f"narrowed the MLPs to {metrics['intermediate_size']} neurons and kept {metrics['num_attention_heads']} query heads")
    if metrics.get("sparsity"):
        parts.append(f"set {metrics['sparsity']:.1%} of the decoder's weights to zero (shapes unchanged, so {1 - metrics['sparsity']:.4f} of them stay nonzero)")
    return " and ".join(parts) or "removed nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="passed to `minigiant run --minutes`")
    parser.add_argument("--output", default="runs/bench-default", help="run directory, relative to the repo root")
    parser.add_argument("--recipe", default=None, help="a shipped recipe's name or a YAML file (default: the default recipe)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to `minigiant run --set` (repeatable), e.g. stages.0.target=0.7")
    args = parser.parse_args()
    os.chdir(ROOT)  # every path in the recorded command is relative to the repo root
    wikitext = os.path.relpath(wikitext2_test(), ROOT)

    from minigiant.cli import main as cli

    argv = ["run", *([args.recipe] if args.recipe else []), "--output", args.output, "--set", f"stages.4.text={wikitext}"]
    if args.minutes:
        argv += ["--minutes", str(args.minutes)]
    for assignment in args.set:
        argv += ["--set", assignment]
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
    timings = json.loads((out / "timings.json").read_text())
    from minigiant.hardware import describe_cpu
    from minigiant.pipeline import stage_minutes_line

    host = describe_cpu()
    today = datetime.date.today().isoformat()
    lines = [
        f"### {today}: the {f'{args.recipe!r} recipe' if args.recipe else 'default run'} end to end{f' with --minutes {args.minutes:g}' if args.minutes else ''}{' with ' + ', '.join(args.set) if args.set else ''} on {host['cpu']} ({host['isa']}, {host['cores']} cores)",
        "",
        f"Measured {today}; the whole run took **{minutes:.1f} min**; distillation ran in {distill.get('precision', {}).get('student', 'bf16')} "
        f"(bf16 is native on this CPU: {'yes' if host['native_bf16'] else 'no'}). "
        f"Command: `{shlex.join(['python', 'benchmarks/default_run.py', *sys.argv[1:]])}` (runs `{command}`). "
        "Perplexity: first 8 non-overlapping 1024-token windows of WikiText-2 raw test; agreement, repeated 4-grams and teacher-judged "
        "chat NLL as `minigiant evaluate` measures them (its defaults); tok/s: greedy decode after a 128-token prompt, one measurement each, "
        "ratios against the teacher in the same run.",
        "",
        "| model | non-embedding params | disk MB | WikiText-2 ppl | top-1 agreement | repeated 4-grams | chat NLL | peak RSS MB | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *[fmt_row(r, teacher) for r in report["models"]],
        "",
        f"Pruning {pruned_shape(prune)} (kept {prune['kept_fraction']:.4f} of the non-embedding parameters{' as dense matrices' if prune.get('sparsity') else ''}). "
        f"Distillation: {distill['steps']} steps, {distill['tokens']:,} tokens in {distill['seconds'] / 60:.1f} min, "
        f"{distill.get('preparation_seconds', 0) / 60:.1f} of them preparing data (the teacher's chat answers on a first run) "
        f"(loss {distill['first_loss']:.3f} → {distill['final_loss']:.3f}, stopped by {distill['stopped_by']})"
        + (f"; it kept the zeros of {distill['sparsity']['masked_matrices']} sparse matrices ({distill['sparsity']['masked_zero_fraction_end']:.1%} of their weights at the end). " if distill.get("sparsity") else ". ") +
        f"Minutes per stage (`timings.json`, planned {timings['planned_minutes']:g} in all): {stage_minutes_line(timings['stages'])}. "
        f"Rows: `benchmarks/results/default_run.json`.",
        "",
    ]
    keys = ("name", "non_embedding_params", "disk_bytes", "perplexity", "top1_agreement", "kl_teacher_student", "chat_judge_nll",
            "chat_judge_nll_stderr", "chat_judge_nll_fresh", "chat_repeat4_rate", "chat_empty_rate", "peak_rss_mb", "ttft_s", "decode_tokens_per_s")
    record = {"date": today, "machine": host, "recipe": args.recipe or "default", "command": command, "minutes": round(minutes, 1), "stage_minutes": {r["stage"]: r["minutes"] for r in timings["stages"]}, "prune": {k: prune.get(k) for k in ("intermediate_size", "num_attention_heads", "removed_layers", "kept_fraction", "sparsity")},
              "distill": {k: distill.get(k) for k in ("steps", "tokens", "seconds", "preparation_seconds", "tokens_per_s", "precision", "first_loss", "final_loss", "sparsity")},
              "rows": [{k: r.get(k) for k in keys} for r in report["models"]]}
    results_file = ROOT / "benchmarks" / "results" / "default_run.json"
    history = json.loads(results_file.read_text()) if results_file.exists() else {"runs": []}
    if "runs" not in history:  # the first file held one run
        history = {"runs": [history]}
    history["runs"].append(record)
    results_file.write_text(json.dumps(history, indent=1) + "\n")

    # The newest run goes first under the section heading; earlier runs stay below it for comparison.
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text() if bench.exists() else "# Benchmarks\n\nEvery number here was measured by a script in `benchmarks/`; the command is given with it.\n\n"
    if SECTION not in text:
        text = text.rstrip() + "\n\n" + SECTION + "\n\n"
    head = text.index(SECTION) + len(SECTION) + 1
    bench.write_text(text[:head] + "\n" + "\n".join(lines) + text[head:])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
