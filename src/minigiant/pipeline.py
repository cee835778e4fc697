"""Run a recipe: load the teacher, apply each stage to a copy of its input model, write one model
directory per stage (``NN-name``), then evaluate and report.

A stage whose output directory already holds the same lineage fingerprint (same input, verb, settings,
seed and time scale) is reused, so a rerun after a crash or Ctrl-C continues where it stopped; distillation
itself resumes from its last checkpoint in ``.NN-name.work/``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import yaml

from . import artifact
from .context import Context
from .models.architecture import total_parameters
from .models.loading import load
from .progress import console, log
from .recipe import Recipe, planned_minutes
from .stages import stage


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_or_make(out_dir: Path, fingerprint: str, make, overwrite: bool = False) -> tuple:
    """``(model, tokenizer, reused)``: the model in ``out_dir`` if it was made with the same fingerprint
    (``reused=True``), else ``make()``'s, saved there first (replacing a model an earlier run left there,
    whatever stage made it)."""
    saved = artifact.read_lineage(out_dir)
    if saved and saved.get("fingerprint") == fingerprint:
        log(f"[dim]{out_dir.name}: already made with these settings, reusing it")
        return (*load(out_dir), True)
    model, tokenizer = make()
    artifact.lineage(model)["fingerprint"] = fingerprint
    artifact.save(model, tokenizer, out_dir, overwrite=overwrite, replaces=("model",))
    return model, tokenizer, False


class _StageClock:
    """Wall minutes of each stage, rewritten to ``timings.json`` in the run folder after every stage: the
    recipe plans a total (``minutes``) and this says where it went, also for a run that crashed midway."""

    def __init__(self, out: Path, planned_minutes: float | None):
        self.path, self.planned, self.started, self.rows = out / "timings.json", planned_minutes, time.perf_counter(), []
        self.unbudgeted = 0.0  # minutes taken so far by stages without a time budget

    def elapsed(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def record(self, name: str, verb: str, since: float, reused: bool = False, budgeted: bool = False) -> None:
        minutes = (time.perf_counter() - since) / 60
        self.rows.append({"stage": name, "verb": verb, "minutes": round(minutes, 2), "reused": reused})
        if not budgeted:
            self.unbudgeted += minutes
        total = round(self.elapsed(), 2)
        artifact.write_atomic(self.path, json.dumps({"planned_minutes": self.planned, "total_minutes": total, "stages": self.rows}, indent=1) + "\n")


def budget_cap(planned: float, elapsed: float, unbudgeted: float, later_budgets: float, unbudgeted_after: bool) -> float:
    """The most minutes a stage with a time budget may take so that the run ends within its ``planned``
    minutes: what is left of them after ``elapsed``, less the budgets of later stages and, when stages without
    a budget follow (quantize, evaluate), as long again as those before it took (``unbudgeted``). On the
    default recipe the two take about as long on any CPU: 3.8 and 3.9 minutes on 2 AMX cores, 7.8 and 7.5 on 2
    AVX2 cores, where the budget as planned ran 4 minutes over (BENCHMARKS.md). Negative when the run is already
    past its plan; the stage decides what to do then (distill trains a quarter of its budget)."""
    return planned - elapsed - later_budgets - (unbudgeted if unbudgeted_after else 0.0)


def stage_minutes_line(rows: list[dict]) -> str:
    """``timings.json``'s stages as one line: ``teacher 0.3, prune 3.5 (reused), ...``."""
    return ", ".join(f"{r['stage']} {r['minutes']:.1f}" + (" (reused)" if r["reused"] else "") for r in rows)


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The paths a recipe reads (teacher, text files): the run folder must neither be nor contain them."""
    from .data.text import text_paths
    from .models.loading import resolve_source

    return [resolve_source(recipe.model), *(p for spec in recipe.stages for p in text_paths(spec.config))]


def run(recipe: Recipe, time_scale: float = 1.0, overwrite: bool = False) -> dict:
    """Run every stage of ``recipe``; returns ``{"output": dir, "models": {name: dir}, "results": [...]}``.

    ``recipe.output`` must be new, empty, or an earlier run folder; ``overwrite=True`` also writes into a
    folder of other files (see ``artifact.check_output``)."""
    out = Path(recipe.output)
    clock = _StageClock(out, planned_minutes(recipe, time_scale))  # the run's clock starts here
    artifact.check_output(out, "run", inputs=recipe_inputs(recipe), overwrite=overwrite)
    with artifact.writing(out):
        out.mkdir(parents=True, exist_ok=True)
    artifact.write_atomic(out / "recipe.yaml", artifact.RUN_HEADER + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    log(f"[bold]minigiant run[/] → {out}  (teacher: {recipe.model}, {len(recipe.stages)} stages, time scale {time_scale:g})")

    def load_teacher():
        teacher, tokenizer = load(recipe.model)
        artifact.record_stage(teacher, "load", {"source": recipe.model}, {"params": total_parameters(teacher)})
        return teacher, tokenizer

    teacher_dir = out / "00-teacher"
    # On a rerun the saved float32 teacher loads faster than dequantizing the GGUF again.
    teacher, tokenizer, reused = _load_or_make(teacher_dir, _fingerprint("load", recipe.model), load_teacher, overwrite)
    clock.record("teacher", "load", clock.started, reused)
    ctx = Context(tokenizer=tokenizer, teacher=teacher, seed=recipe.seed, time_scale=time_scale)
    models: dict[str, tuple] = {"teacher": (teacher, teacher_dir)}
    results: list[dict] = []
    previous = "teacher"
    for index, spec in enumerate(recipe.stages, start=1):
        kind = stage(spec.verb)
        stage_started = time.perf_counter()
        if spec.verb == "select":
            from .select import run_select_stage

            run_select_stage(results, spec.config, out)
            clock.record(spec.name, spec.verb, stage_started)
            continue
        if not kind.makes_model:
            from .evaluate import all_cached, measure_and_report

            measured = {name: models[name][1] for name in spec.models or list(models)}
            reused = all_cached(measured, spec.config, out)
            results = measure_and_report(measured, spec.config, out)  # out was checked above
            clock.record(spec.name, spec.verb, stage_started, reused)
            continue
        source_model, _ = models[spec.input or previous]
        out_dir = out / f"{index:02d}-{spec.name}"
        settings = dataclasses.asdict(spec.config)
        fingerprint = _fingerprint(artifact.lineage(source_model).get("fingerprint"), spec.verb, settings, recipe.seed, time_scale)
        log(f"[bold]stage {index}/{len(recipe.stages)}: {spec.verb}[/] ({spec.name}, from {spec.input or previous})")
        work_dir = out / f".{out_dir.name}.work"
        ctx.minutes_cap = None
        if spec.budget and clock.planned:
            later = recipe.stages[index:]
            ctx.minutes_cap = budget_cap(clock.planned, clock.elapsed(), clock.unbudgeted, sum(s.budget for s in later) * time_scale,
                                         any(not s.budget for s in later))

        def make(source_model=source_model, kind=kind, spec=spec, work_dir=work_dir):
            ctx.work_dir = work_dir
            return kind.apply(copy.deepcopy(source_model), spec.config, ctx), tokenizer

        model, _, reused = _load_or_make(out_dir, fingerprint, make, overwrite)
        shutil.rmtree(work_dir, ignore_errors=True)
        clock.record(spec.name, spec.verb, stage_started, reused, bool(spec.budget))
        models[spec.name] = (model, out_dir)
        previous = spec.name

    minutes = (time.perf_counter() - clock.started) / 60
    if results:
        from .evaluate.report import summary_table

        console.print(summary_table(results))
    planned = f" (planned {clock.planned:g})" if clock.planned else ""
    log(f"Minutes per stage{planned}: {stage_minutes_line(clock.rows)}")
    log(f"[bold green]done[/] in {minutes:.1f} min. Models: " + ", ".join(str(d) for _, d in models.values()))
    if results:
        log(f"Report: {out / 'report.md'}  ·  {out / 'report.json'}  ·  {out / 'pareto.png'}")
    return {"output": out, "models": {name: d for name, (_, d) in models.items()}, "results": results, "minutes": minutes}
