"""The evaluation report: ``report.md`` for people, ``report.json`` for programs, ``report.html`` (one
self-contained page: table, plots, answers side by side), ``pareto.png`` / ``pareto-speed.png`` for the
quality trade-offs against size and speed, and a rich table for the terminal.

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


def _percent(v) -> str:
    return f"{100 * v:.1f}%"


# (header, result key or function of a result, how to show a value); ratios to the reference row are added
# to every column.
COLUMNS = (
    ("params", "params", _count),
    ("non-emb params", "non_embedding_params", _count),
    ("disk MB", "disk_bytes", lambda v: f"{v / MIB:.1f}"),
    ("bits/weight", "bits_per_weight", lambda v: f"{v:.2f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("peak RSS MB", "peak_rss_mb", lambda v: f"{v:.0f}"),
    ("TTFT s", "ttft_s", lambda v: f"{v:.3f}"),
    ("decode tok/s", "decode_tokens_per_s", lambda v: f"{v:.1f}"),
)
AGREEMENT_COLUMNS = (
    ("top-1 agreement", "top1_agreement", _percent),
    ("KL(teacher‖model)", "kl_teacher_student", lambda v: f"{v:.3f}"),
)
CHAT_COLUMNS = (
    ("chat NLL (teacher)", "chat_judge_nll", lambda v: f"{v:.2f}"),
    ("chat NLL, fresh tokens", "chat_judge_nll_fresh", lambda v: f"{v:.2f}"),
    ("repeated 4-grams", "chat_repeat4_rate", _percent),
    ("empty answers", "chat_empty_rate", _percent),
    ("truncated answers", "chat_truncated_rate", _percent),
)


def task_metrics(results: list[dict]) -> list[tuple[str, str]]:
    """``(task, metric)`` pairs shown in the table: each task's primary metric, in first-seen order."""
    pairs = {}
    for result in results:
        for task, summary in (result.get("tasks") or {}).items():
            if summary.get("primary"):
                pairs.setdefault(task, summary["primary"])
    return list(pairs.items())


def metric_value(result: dict, name: str):
    """A number from a result row by name: a top-level key (``perplexity``), ``task/metric``
    (``hellaswag/acc_norm``), ``task`` alone (its primary metric) or ``score`` (``mean_task_score``)."""
    if name == "score":
        return mean_task_score(result)
    if name in result and not isinstance(result[name], (dict, list)):
        return result[name]
    task, _, metric = name.partition("/")
    summary = (result.get("tasks") or {}).get(task)
    if summary is None:
        return None
    entry = summary["metrics"].get(metric or summary.get("primary") or "")
    return entry["value"] if entry else None


def mean_task_score(result: dict) -> float | None:
    """The mean of the primary metrics of every task (None without tasks)."""
    values = [s["metrics"][s["primary"]]["value"] for s in (result.get("tasks") or {}).values() if s.get("primary")]
    return sum(values) / len(values) if values else None


def _task_cell(result: dict, task: str, metric: str, show=_percent):
    entry = ((result.get("tasks") or {}).get(task) or {}).get("metrics", {}).get(metric)
    if entry is None:
        return None, None
    stderr = entry.get("stderr")
    return entry["value"], show(entry["value"]) + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def all_columns(results: list[dict]) -> list[tuple]:
    """Every column with data in at least one result: tasks, then the mean score, agreement, chat, cost."""
    columns = []
    tasks = task_metrics(results)
    for task, metric in tasks:
        columns.append((f"{task} {metric.split(',')[0]}", lambda r, t=task, m=metric: _task_cell(r, t, m), None))
    if len(tasks) > 1:
        columns.append(("mean task score", mean_task_score, _percent))
    for header, key, show in AGREEMENT_COLUMNS + CHAT_COLUMNS + COLUMNS:
        if any(r.get(key) is not None for r in results):
            columns.append((header, key, show))
    return columns


def _value_and_text(result: dict, key, show):
    if callable(key):
        value = key(result)
        if isinstance(value, tuple):  # a task cell: (value, text with its stderr)
            return value
        return value, (show(value) if value is not None else None)
    value = result.get(key)
    if value is None:
        return None, None
    stderr = result.get(f"{key}_stderr")  # a mean over examples: show how far it can be trusted
    return value, show(value) + (f" ± {show(stderr)}" if stderr is not None else "")


def _rows(results: list[dict], columns=COLUMNS, ratios: bool = True) -> list[list[str]]:
    """One row of cells per model: name, then each column (with its ratio to the first model)."""
    reference = results[0] if results else {}
    rows = []
    for index, result in enumerate(results):
        cells = [result["name"]]
        for _, key, show in columns:
            value, text = _value_and_text(result, key, show)
            if text is None:
                cells.append("–")
                continue
            ref = _value_and_text(reference, key, show)[0] if ratios and index > 0 else None
            if ref:  # None for the reference row itself; 0 would make the ratio meaningless
                text += f" ({value / ref:.2f}×)"
            cells.append(text)
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


def explanation(results: list[dict]) -> str:
    """What the columns mean, in one paragraph (shared by report.md and report.html)."""
    first = results[0]
    parts = [f"Ratios in parentheses are to **{first['name']}**, the first row (the teacher: it judges the chat answers and the others' agreement is measured against it)."]
    samples = {f"{t} {s.get('samples')}" + (f", {s['num_fewshot']}-shot" if s.get("num_fewshot") else "") for r in results for t, s in (r.get("tasks") or {}).items()}
    if samples:
        parts.append("Tasks through lm-evaluation-harness, accuracy ± its standard error (examples per task: " + "; ".join(sorted(samples)) + ").")
    if first.get("agreement_tokens"):
        parts.append(f"Agreement: share of {first['agreement_tokens']} held-out positions where the model's top next token is the teacher's; KL in nats per position.")
    if first.get("chat_judge_nll") is not None or first.get("chat_repeat4_rate") is not None:
        parts.append("Chat: greedy answers to held-out instructions; NLL = the teacher's mean negative log-likelihood per answer token, averaged over answers ± its standard error (lower: more natural to the teacher; two models' NLLs that differ by less than about twice that error are not told apart); NLL on fresh tokens = the same over the answer tokens that do not complete a token 4-gram already in the answer (the teacher predicts a loop's next turn, so repeats lower the plain NLL); repeated 4-grams = share of word 4-grams that repeat an earlier one in the same answer; truncated = hit the token limit without ending.")
    parts.append(f"Perplexity: non-overlapping windows of held-out text ({first.get('ppl_tokens')} predicted tokens per model). Peak RSS: the process's peak memory to load the model and generate. "
                 f"TTFT: time to the first token after a prompt of {SPEED_PROMPT_TOKENS} tokens of that text; speeds are batch 1 on this machine, comparable only within one report. MB = 2^20 bytes.")
    return " ".join(parts)


def markdown(results: list[dict], title: str) -> str:
    columns = all_columns(results)
    header = ["model", "made by", *(h for h, _, _ in columns)]
    rows = [[r[0], " → ".join(filter(None, res.get("lineage_stages") or [])) or "–", *r[1:]] for r, res in zip(_rows(results, columns), results)]
    parts = [f"# {title}", ""]
    if results:
        parts += [explanation(results), ""]
    parts += [_markdown_table(header, rows), ""]
    prompts = list(dict.fromkeys(a["prompt"] for r in results for a in r.get("answers") or []))
    if prompts:
        parts += ["## Answers side by side", "", "Greedy decoding, so every run gives the same text.", ""]
    for prompt in prompts:
        answers = [[r["name"], next((a["answer"] for a in r.get("answers") or [] if a["prompt"] == prompt), "–")] for r in results]
        parts += [f"### {prompt}", "", _markdown_table(["model", "answer"], answers), ""]
    return "\n".join(parts)


def quality_axis(results: list[dict]) -> tuple[str, object, bool]:
    """``(label, function of a result, higher is better)``: the mean task score when there are tasks, else
    the agreement with the teacher, else perplexity."""
    if any(mean_task_score(r) is not None for r in results):
        return "mean task score (higher is better)", mean_task_score, True
    if any(r.get("top1_agreement") is not None for r in results) and len(results) > 1:
        return "top-1 agreement with the teacher (higher is better)", lambda r: r.get("top1_agreement"), True
    return "perplexity (log scale, lower is better)", lambda r: r.get("perplexity"), False


def pareto_png(results: list[dict], title: str, x: str = "size") -> bytes:
    """Quality against size on disk (``x="size"``) or decode speed (``x="speed"``): one labelled point per
    model, the Pareto frontier (no other model is better on both axes) as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    label, quality, higher = quality_axis(results)
    if x == "size":
        x_label, x_of, x_higher = "weights on disk (MB)", (lambda r: r["disk_bytes"] / MIB if r.get("disk_bytes") else None), False
    else:
        x_label, x_of, x_higher = "decode tokens/s, batch 1 (higher is better)", (lambda r: r.get("decode_tokens_per_s")), True
    named = []
    for r in results:
        xv, yv = x_of(r), quality(r)
        if xv is not None and yv is not None and math.isfinite(yv):
            named.append((r["name"], xv, yv))
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)  # an off-screen canvas: no display and no global pyplot state
    ax = figure.add_subplot()
    if named:
        xs = [v for _, v, _ in named]
        ys = [v for _, _, v in named]
        # pareto_front minimises both coordinates: flip the ones where higher is better
        front = pareto_front([(-a if x_higher else a, -b if higher else b) for a, b in zip(xs, ys)])
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:orange", label="Pareto frontier", zorder=1)
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
        for name, xv, yv in named:
            ax.annotate(name, (xv, yv), xytext=(5, 5), textcoords="offset points", fontsize=9)
        if not higher:
            ax.set_yscale("log")
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(LogFormatter())  # plain numbers (12.5), not 1.25×10¹
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, f"no model has both a {x_label.split(' (')[0]} and a quality number", ha="center", transform=ax.transAxes)
    ax.set_xlabel(x_label)
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def healing_curves(results: list[dict]) -> list[tuple[str, list]]:
    """``(label, curve)`` per distillation: models whose lineage carries the same curve (a distilled model and
    the quantized copies made from it) share one line, labelled with all their names."""
    groups: dict[str, tuple[list, list[str]]] = {}
    for r in results:
        curve = r.get("distill_curve")
        if curve and len(curve) > 1:
            groups.setdefault(json.dumps(curve), (curve, []))[1].append(r["name"])
    return [(names[0] if len(names) == 1 else f"{names[0]} (same run: {', '.join(names[1:])})", curve) for curve, names in groups.values()]


def healing_png(results: list[dict], title: str) -> bytes | None:
    """Held-out perplexity against distillation minutes, one line per distillation (``healing_curves``);
    None when no model recorded a curve (``distill.eval_every``)."""
    curves = healing_curves(results)
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, curve in curves:
        ax.plot([p[0] for p in curve], [p[2] for p in curve], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distillation minutes")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title(f"{title}: healing")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(results: list[dict], out_dir: str | os.PathLike, title: str = "minigiant evaluation") -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.html``, ``pareto.png`` (quality vs size),
    ``pareto-speed.png`` (quality vs decode speed) and, when a model's distillation recorded one,
    ``healing.png`` (held-out perplexity vs minutes) into ``out_dir``; returns their paths."""
    from .html import html_report

    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md", "json": out_dir / "report.json", "html": out_dir / "report.html",
        "plot": out_dir / "pareto.png", "speed_plot": out_dir / "pareto-speed.png",
    }
    reference = results[0]["name"] if results else None
    write_atomic(paths["json"], json.dumps({"title": title, "reference": reference, "models": results}, indent=2))
    write_atomic(paths["markdown"], markdown(results, title))
    plots = {"size": pareto_png(results, title, "size"), "speed": pareto_png(results, title, "speed")}
    write_atomic(paths["plot"], plots["size"])
    write_atomic(paths["speed_plot"], plots["speed"])
    healing = healing_png(results, title)
    if healing is not None:
        paths["healing_plot"] = out_dir / "healing.png"
        write_atomic(paths["healing_plot"], healing)
        plots["healing"] = healing
    write_atomic(paths["html"], html_report(results, title, plots))
    return paths


def summary_table(results: list[dict]):
    """A rich table of the main numbers, one row per model, narrow enough for an 80-column terminal
    (report.md adds the ratios and the answers)."""
    from rich.table import Table

    wanted = {"disk_bytes", "perplexity", "top1_agreement", "chat_judge_nll", "decode_tokens_per_s", "peak_rss_mb"}
    columns = [c for c in all_columns(results) if c[1] in wanted or c[0] == "mean task score"]
    table = Table(title="evaluation")
    table.add_column("model", style="bold")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in _rows(results, columns, ratios=False):
        table.add_row(*row)
    return table
