"""The evaluation report: ``report.md`` for people, ``report.json`` for programs, ``pareto.png`` for the
size/quality trade-off, and a rich table for the terminal.

The first result is the reference (the teacher in a recipe): every other row also shows its ratio to it.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from ..artifact import write_atomic, writing
from . import SPEED_PROMPT_TOKENS

MIB = 1024 * 1024


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


# (header, result key, how to show a value); ratios to the reference row are added to every column.
COLUMNS = (
    ("params", "params", _count),
    ("non-emb params", "non_embedding_params", _count),
    ("disk MB", "disk_bytes", lambda v: f"{v / MIB:.1f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("peak RSS MB", "peak_rss_mb", lambda v: f"{v:.0f}"),
    ("TTFT s", "ttft_s", lambda v: f"{v:.3f}"),
    ("decode tok/s", "decode_tokens_per_s", lambda v: f"{v:.1f}"),
)


def _cell(value, reference, show) -> str:
    if value is None:
        return "–"
    text = show(value)
    if reference:  # None for the reference row itself; 0 would make the ratio meaningless
        text += f" ({value / reference:.2f}×)"
    return text


def _rows(results: list[dict], columns=COLUMNS, ratios: bool = True) -> list[list[str]]:
    """One row of cells per model: name, then each column (with its ratio to the first model)."""
    reference = results[0] if results else {}
    rows = []
    for index, result in enumerate(results):
        cells = [result["name"]]
        for _, key, show in columns:
            ref = reference.get(key) if ratios and index > 0 else None
            cells.append(_cell(result.get(key), ref, show))
        rows.append(cells)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller x and smaller y are better), in
    order of increasing x. Of identical points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: points[i])  # stable: ties keep their input order
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def markdown(results: list[dict], title: str) -> str:
    header = ["model", "made by", *(h for h, _, _ in COLUMNS)]
    rows = [[r[0], " → ".join(filter(None, res.get("lineage_stages") or [])) or "–", *r[1:]] for r, res in zip(_rows(results), results)]
    parts = [f"# {title}", ""]
    if results:
        ppl_tokens = results[0].get("ppl_tokens")
        parts += [
            f"Ratios in parentheses are to **{results[0]['name']}**, the first row. "
            f"Perplexity: non-overlapping windows of held-out text ({ppl_tokens} predicted tokens per model). "
            "Peak RSS: the process's peak memory to load the model and generate. "
            f"TTFT: time to the first token after a prompt of {SPEED_PROMPT_TOKENS} tokens of that text. MB = 2^20 bytes.",
            "",
        ]
    parts += [_markdown_table(header, rows), ""]
    prompts = list(dict.fromkeys(a["prompt"] for r in results for a in r.get("answers") or []))
    if prompts:
        parts += ["## Answers to the fixed prompts", "", "Greedy decoding, so every run gives the same text.", ""]
    for prompt in prompts:
        answers = [[r["name"], next((a["answer"] for a in r.get("answers") or [] if a["prompt"] == prompt), "–")] for r in results]
        parts += [f"### {prompt}", "", _markdown_table(["model", "answer"], answers), ""]
    return "\n".join(parts)


def pareto_png(results: list[dict], title: str) -> bytes:
    """Perplexity (log scale) against size on disk, one labelled point per model, the frontier as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    named = [
        (r["name"], r["disk_bytes"] / MIB, r["perplexity"])
        for r in results
        if r.get("disk_bytes") is not None and r.get("perplexity") is not None and math.isfinite(r["perplexity"])
    ]
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)  # an off-screen canvas: no display and no global pyplot state
    ax = figure.add_subplot()
    if named:
        xs = [x for _, x, _ in named]
        ys = [y for _, _, y in named]
        front = pareto_front(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:orange", label="Pareto frontier", zorder=1)
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
        for name, x, y in named:
            ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=9)
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(LogFormatter())  # plain numbers (12.5), not 1.25×10¹
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no model has both a size on disk and a finite perplexity", ha="center", transform=ax.transAxes)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(results: list[dict], out_dir: str | os.PathLike, title: str = "minigiant evaluation") -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``pareto.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json", "plot": out_dir / "pareto.png"}
    reference = results[0]["name"] if results else None
    write_atomic(paths["json"], json.dumps({"title": title, "reference": reference, "models": results}, indent=2))
    write_atomic(paths["markdown"], markdown(results, title))
    write_atomic(paths["plot"], pareto_png(results, title))
    return paths


def summary_table(results: list[dict]):
    """A rich table of the main numbers, one row per model, narrow enough for an 80-column terminal
    (report.md adds the ratios and the answers)."""
    from rich.table import Table

    columns = [c for c in COLUMNS if c[1] != "non_embedding_params"]
    table = Table(title="evaluation")
    table.add_column("model", style="bold")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in _rows(results, columns, ratios=False):
        table.add_row(*row)
    return table
