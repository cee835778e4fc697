"""Select: the best model under a budget. Candidates are evaluated models (rows of a ``report.json``, a run
directory holding one, or model directories, which are evaluated first); constraints are limits on
memory, disk, speed and latency, and minimum (or maximum) values of any measured metric. Candidates that
fail a constraint are dropped with the reason, the rest are ranked, and the pick is explained in one
paragraph. When nothing fits, the answer says which constraint binds and by how much.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .config import field
from .errors import ConfigError, DataError, ModelLoadError

MIB = 1024 * 1024
LOWER_IS_BETTER = {"perplexity", "kl_teacher_student", "chat_judge_nll", "chat_judge_nll_fresh", "chat_repeat4_rate", "chat_empty_rate", "chat_truncated_rate",
                   "ttft_s", "peak_rss_mb", "disk_bytes", "params", "bits_per_weight"}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_./,\-]+)\s*(>=|<=)\s*([-+0-9.eE]+%?)\s*$")


@dataclass
class SelectConfig:
    max_ram_mb: Optional[float] = field(None, help="largest peak memory (RSS, MiB) to load the model and generate")
    max_disk_mb: Optional[float] = field(None, help="largest weights on disk (MiB)")
    min_decode_tokens_per_s: Optional[float] = field(None, help="slowest acceptable decode speed (tokens/s, batch 1, as measured by evaluate)")
    max_ttft_s: Optional[float] = field(None, help="longest acceptable time to first token (seconds)")
    require: Union[list[str], str] = field([], help="metric bounds, e.g. 'hellaswag/acc_norm>=0.35' (a fraction, or 35%), 'perplexity<=40', 'score>=0.4' (mean task score)")
    rank_by: str = field("auto", help="metric to rank the models that fit by: 'auto' (mean task score, else teacher agreement, else perplexity) or any metric name")
    data_dir: Optional[str] = field(None, help="data folder for tasks named in `require`, when model directories must be evaluated first")
    limit: Optional[int] = field(200, help="examples per task when model directories must be evaluated first")

    def validate(self, path: str) -> None:
        for name in ("max_ram_mb", "max_disk_mb", "min_decode_tokens_per_s", "max_ttft_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0, got {value}")
        if isinstance(self.require, str):
            self.require = [self.require]  # one bound from the CLI (a list in YAML: [a>=1, b<=2]); never split at commas, metric names hold them
        bounds: dict[str, list] = {}
        for text in self.require:
            metric, op, bound = parse_requirement(text, path)
            bounds.setdefault(metric, [None, None])[0 if op == ">=" else 1] = bound
        for metric, (low, high) in bounds.items():
            if low is not None and high is not None and low > high:
                raise ConfigError(f"{path}.require: {metric} must be >= {low:g} and <= {high:g} at once, which no model can be; drop one of the two")


def parse_requirement(text: str, path: str = "select") -> tuple[str, str, float]:
    match = _REQUIREMENT.match(text)
    if not match:
        raise ConfigError(f"{path}.require: {text!r} is not METRIC>=VALUE or METRIC<=VALUE, e.g. 'hellaswag/acc_norm>=0.35'")
    metric, op, raw = match.groups()
    try:
        bound = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{path}.require: {raw!r} in {text!r} is not a number") from None
    return metric, op, bound


@dataclass
class Constraint:
    label: str  # how a person reads it: "peak RSS", "hellaswag/acc_norm"
    metric: str  # the result key or task/metric name
    op: str  # ">=" or "<="
    bound: float
    show: object = lambda v: f"{v:.4g}"

    def value(self, result: dict):
        from .evaluate.report import metric_value

        if self.metric == "disk_mb":
            return result["disk_bytes"] / MIB if result.get("disk_bytes") is not None else None
        return metric_value(result, self.metric)

    def gap(self, value: float) -> float:
        """How far ``value`` is on the wrong side of the bound (0 when it passes)."""
        return max(0.0, self.bound - value) if self.op == ">=" else max(0.0, value - self.bound)

    def describe(self) -> str:
        return f"{self.label} {'≥' if self.op == '>=' else '≤'} {self.show(self.bound)}"


def constraints_of(config: SelectConfig) -> list[Constraint]:
    out = []
    if config.max_ram_mb is not None:
        out.append(Constraint("peak RSS (MiB)", "peak_rss_mb", "<=", config.max_ram_mb, lambda v: f"{v:.0f}"))
    if config.max_disk_mb is not None:
        out.append(Constraint("disk (MiB)", "disk_mb", "<=", config.max_disk_mb, lambda v: f"{v:.1f}"))
    if config.min_decode_tokens_per_s is not None:
        out.append(Constraint("decode tok/s", "decode_tokens_per_s", ">=", config.min_decode_tokens_per_s, lambda v: f"{v:.1f}"))
    if config.max_ttft_s is not None:
        out.append(Constraint("TTFT (s)", "ttft_s", "<=", config.max_ttft_s, lambda v: f"{v:.3f}"))
    for text in config.require:
        metric, op, bound = parse_requirement(text)
        out.append(Constraint(metric, metric, op, bound))
    return out


def _rank_metric(config: SelectConfig, results: list[dict]) -> tuple[str, bool]:
    """``(metric, higher is better)``."""
    from .evaluate.report import mean_task_score

    if config.rank_by != "auto":
        name = config.rank_by.lstrip("-")
        return name, name.split("/")[0] not in LOWER_IS_BETTER and not config.rank_by.startswith("-")
    if any(mean_task_score(r) is not None for r in results):
        return "score", True
    if any(r.get("top1_agreement") is not None for r in results[1:]):
        return "top1_agreement", True
    return "perplexity", False


def _fmt(metric: str, value) -> str:
    if value is None:
        return "–"
    if metric == "score" or "/" in metric or metric.endswith(("agreement", "_rate")):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def select(results: list[dict], config: SelectConfig | None = None) -> dict:
    """Rank evaluated models (rows as in ``report.json``) under ``config``; see the module doc. Returns
    ``{"pick", "ranked", "dropped", "binding", "explanation", "rank_by"}``."""
    config = config or SelectConfig()
    config.validate("select")
    if not results:
        raise DataError("no candidate models to select from; pass a report.json, a run directory or model directories")
    constraints = constraints_of(config)
    metric, higher = _rank_metric(config, results)
    from .evaluate.report import metric_value

    fits, dropped = [], []
    for r in results:
        reasons, gaps = [], {}
        for c in constraints:
            value = c.value(r)
            if value is None:
                reasons.append(f"{c.label} was not measured")
                gaps[c.describe()] = math.inf
            elif c.gap(value) > 0:
                reasons.append(f"{c.label} {c.show(value)} fails {c.describe()}")
                gaps[c.describe()] = c.gap(value)
        entry = {"name": r["name"], "path": r.get("path"), metric: metric_value(r, metric)}
        if reasons:
            dropped.append({**entry, "reasons": reasons, "gaps": gaps})
        else:
            fits.append(entry)

    def key(e):
        v = e[metric]
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, -(v or 0) if higher else (v if v is not None else math.inf))

    fits.sort(key=key)
    answer = {"rank_by": metric, "higher_is_better": higher, "constraints": [c.describe() for c in constraints], "ranked": fits, "dropped": dropped, "pick": None, "binding": None}
    if fits:
        best = fits[0]
        answer["pick"] = best["name"]
        text = f"Pick {best['name']}" + (f" ({best['path']})" if best.get("path") else "") + ": "
        text += f"it meets all {len(constraints)} constraints ({'; '.join(c.describe() for c in constraints)})" if constraints else "no constraints were given"
        text += f" and has the {'highest' if higher else 'lowest'} {metric} ({_fmt(metric, best[metric])}) of the {len(fits)} model(s) that fit."
        if len(fits) > 1:
            text += f" Runner-up: {fits[1]['name']} ({_fmt(metric, fits[1][metric])})."
        if dropped:
            text += " Dropped: " + "; ".join(f"{d['name']} ({', '.join(d['reasons'])})" for d in dropped) + "."
        answer["explanation"] = text
    else:
        answer["binding"], answer["explanation"] = _binding(dropped, constraints)
    return answer


def _binding(dropped: list[dict], constraints: list[Constraint]) -> tuple[dict | None, str]:
    """Which single constraint, relaxed, would let a model in, and by how much (the smallest relative
    relaxation over the models that fail only that one)."""
    single = [(d, *next(iter(d["gaps"].items()))) for d in dropped if len(d["gaps"]) == 1 and math.isfinite(next(iter(d["gaps"].values())))]
    if single:
        def relative(item):
            d, label, gap = item
            bound = next(c.bound for c in constraints if c.describe() == label)
            return gap / abs(bound) if bound else gap

        d, label, gap = min(single, key=relative)
        c = next(c for c in constraints if c.describe() == label)
        new_bound = c.bound - gap if c.op == ">=" else c.bound + gap
        binding = {"constraint": label, "model": d["name"], "gap": gap, "relaxed_bound": new_bound}
        text = (f"No model fits. The binding constraint is {label}: {d['name']} misses it by {c.show(gap)} and meets every other one, "
                f"so relaxing it to {c.show(new_bound)} would admit {d['name']}. " + "; ".join(f"{x['name']}: {', '.join(x['reasons'])}" for x in dropped) + ".")
        return binding, text
    closest = min(dropped, key=lambda d: len(d["gaps"]))
    text = (f"No model fits, and no single constraint binds: every model fails at least {len(closest['gaps'])} of them. Closest: {closest['name']} "
            f"({', '.join(closest['reasons'])}). " + "; ".join(f"{x['name']}: {', '.join(x['reasons'])}" for x in dropped if x is not closest) + ".")
    return None, text.replace(". .", ".")


def _report_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a readable report.json ({exc}); pass the report.json written by minigiant evaluate") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise DataError(f"{path} is not a minigiant report.json (no 'models' list); pass the report.json written by minigiant evaluate")
    return data["models"]


def load_candidates(sources: list[str | os.PathLike], config: SelectConfig | None = None, out_dir: str | os.PathLike = "selection") -> list[dict]:
    """Result rows for ``sources``: report.json files and run directories are read; model directories
    (alone or inside a run directory without a report) are evaluated into ``out_dir`` first, with the
    tasks that ``require`` names."""
    config = config or SelectConfig()
    rows, to_evaluate = [], {}
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".json":
            rows += _report_rows(path)
        elif path.is_dir() and (path / "report.json").is_file():
            rows += _report_rows(path / "report.json")
        elif path.is_dir() and (path / "config.json").is_file():
            to_evaluate[path.name] = path
        elif path.is_dir() and any((p / "config.json").is_file() for p in path.iterdir() if p.is_dir()):
            for p in sorted(path.iterdir()):
                if (p / "config.json").is_file():
                    to_evaluate[p.name] = p
        elif not path.exists():
            raise ModelLoadError(f"candidate {source} does not exist; pass model directories, a run directory or a report.json")
        else:
            raise ModelLoadError(f"candidate {source} is not a model directory (no config.json), a run directory or a report.json")
    if to_evaluate:
        from .evaluate import EvaluateConfig, evaluate_dirs
        from .evaluate.harness import shipped_tasks

        tasks = sorted({parse_requirement(r)[0].split("/")[0] for r in config.require} & set(shipped_tasks()))
        evaluation = EvaluateConfig(tasks=tasks, limit=config.limit, data_dir=config.data_dir)
        rows += evaluate_dirs(to_evaluate, evaluation, out_dir)
    names = [r["name"] for r in rows]
    for r in rows:
        if names.count(r["name"]) > 1:  # two reports with a "teacher" row each: tell them apart by path
            r["name"] = f"{r['name']} ({r.get('path')})"
    return rows


def markdown(answer: dict) -> str:
    lines = ["# Selection", "", answer["explanation"], "", f"| rank | model | {answer['rank_by']} |", "| --- | --- | --- |"]
    for i, e in enumerate(answer["ranked"], 1):
        lines.append(f"| {i} | {e['name']} | {_fmt(answer['rank_by'], e[answer['rank_by']])} |")
    for d in answer["dropped"]:
        lines.append(f"| dropped | {d['name']} | {'; '.join(d['reasons'])} |")
    return "\n".join(lines) + "\n"



def run_select_stage(results: list[dict], config: SelectConfig, out_dir: str | os.PathLike) -> dict:
    """A recipe's ``select`` stage: choose among the models the previous ``evaluate`` stage measured and
    write ``selection.md`` and ``selection.json`` beside the report."""
    from .artifact import write_atomic
    from .progress import log

    if not results:
        raise ConfigError("a select stage needs an evaluate stage before it (it chooses among the evaluated models)")
    answer = select(results, config)
    out_dir = Path(out_dir)
    write_atomic(out_dir / "selection.json", json.dumps(answer, indent=2))
    write_atomic(out_dir / "selection.md", markdown(answer))
    log(f"[bold]select[/]: {answer['explanation']}")
    return answer


__all__ = ["SelectConfig", "load_candidates", "run_select_stage", "select"]
