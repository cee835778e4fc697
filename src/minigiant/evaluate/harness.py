"""Standard benchmarks through lm-evaluation-harness: our in-memory model (float, pruned or quantized with
our own modules) goes to lm-eval's ``HFLM`` wrapper, which does all the prompting and scoring.

A task is named three ways:
- a task shipped in ``evaluate/tasks/`` (hellaswag, arc_easy, ...): lm-eval's own definition pointed at a
  local file under the data directory (``{data_dir}`` in its ``data_files``), so it runs offline;
- a path to a user's task YAML (lm-eval's format; ``{data_dir}`` works there too, other relative
  ``data_files`` are relative to the YAML's folder);
- any other lm-eval task name, fetched from the Hugging Face hub (needs a network).

A shipped or user YAML is checked before anything slow runs: unknown keys, missing fields, template
variables that are not columns of the data, and data files that do not exist each fail with one sentence.
Each task's result is cached per (model fingerprint, task definition, limit, few-shot).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError, did_you_mean

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_DIR_ENV = "MINIGIANT_DATA"
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match")  # the one number a table shows per task, in preference order
REQUIRED = ("task", "dataset_path", "doc_to_text", "doc_to_target")


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


@dataclass
class TaskSpec:
    name: str
    config: dict | None  # lm-eval TaskConfig fields; None: an lm-eval registry name
    source: str  # the YAML it came from, or "lm-eval"

    def fingerprint(self) -> str:
        """Changes when the definition or any data file it reads changes."""
        files = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in _data_files(self.config or {})]
        text = json.dumps([self.name, self.config, files], sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _data_files(config: dict) -> list[str]:
    files = ((config.get("dataset_kwargs") or {}).get("data_files")) or []
    if isinstance(files, dict):
        files = list(files.values())
    if isinstance(files, str):
        files = [files]
    out = []
    for f in files:
        out.extend([f] if isinstance(f, str) else list(f))
    return out


def _task_config_fields() -> set[str]:
    import dataclasses

    from lm_eval.config.task import TaskConfig

    return {f.name for f in dataclasses.fields(TaskConfig)}


def _read_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path)  # lm-eval's loader: `include:` and `!function` work as in lm-eval
    except Exception as exc:  # yaml errors, a bad !function target, an include cycle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"task file {path} could not be read ({first}); fix the YAML") from None


def _resolve_data_files(config: dict, data_dir: Path, base: Path) -> None:
    """``{data_dir}`` → the data directory; other relative paths → relative to the YAML's folder."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return

    def fix(f: str) -> str:
        f = f.replace("{data_dir}", str(data_dir))
        return f if Path(f).is_absolute() else str(base / f)

    if isinstance(files, str):
        kwargs["data_files"] = fix(files)
    elif isinstance(files, list):
        kwargs["data_files"] = [fix(f) for f in files]
    elif isinstance(files, dict):
        kwargs["data_files"] = {k: fix(v) if isinstance(v, str) else [fix(f) for f in v] for k, v in files.items()}


def _first_row(config: dict, file: str) -> dict | None:
    """The first data row's columns, read the way ``datasets`` will (json lines or array; csv/tsv header)."""
    kind = config.get("dataset_path")
    with open(file, encoding="utf-8") as handle:
        if kind == "json":
            head = handle.read(1)
            handle.seek(0)
            if head == "[":
                rows = json.load(handle)
                return rows[0] if rows else None
            for line in handle:
                if line.strip():
                    return json.loads(line)
            return None
        if kind == "csv":
            import csv

            delimiter = (config.get("dataset_kwargs") or {}).get("delimiter") or (config.get("dataset_kwargs") or {}).get("sep") or ","
            header = next(csv.reader(handle, delimiter=delimiter), None)
            return dict.fromkeys(header) if header else None
    return None


def _template_variables(template) -> set[str]:
    import jinja2
    from jinja2 import meta

    if not isinstance(template, str) or "{{" not in template and "{%" not in template:
        return set()
    try:
        return meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"template {template!r} is not valid Jinja ({exc.message})") from None


def check_task(config: dict, where: str) -> None:
    """Fail with one sentence on what lm-eval would otherwise report deep inside a run (or not at all)."""
    known = _task_config_fields()
    for key in config:
        if key not in known and key not in ("include", "group", "tag"):
            raise ConfigError(f"{where}: unknown task key {key!r}; {did_you_mean(key, known)}see lm-eval's TaskConfig for valid keys")
    for key in REQUIRED:
        if config.get(key) in (None, ""):
            raise ConfigError(f"{where}: missing required field {key!r}")
    output_type = config.get("output_type", "generate_until")
    if output_type == "multiple_choice" and config.get("doc_to_choice") is None:
        raise ConfigError(f"{where}: a multiple_choice task needs doc_to_choice (the list of answers to score)")
    if not any(config.get(k) for k in ("test_split", "validation_split")):
        raise ConfigError(f"{where}: name the split to evaluate with test_split (or validation_split)")
    files = _data_files(config)
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"{where}: data file not found: {f}; pass --data-dir pointing at the folder that holds it (or fix data_files)")
    if not files or config.get("process_docs") is not None:
        return  # hub data or rows reshaped by a function: the columns are not known here
    split = config.get("test_split") or config.get("validation_split")
    data_files = config["dataset_kwargs"]["data_files"]
    file = data_files.get(split) if isinstance(data_files, dict) else files[0]
    if file is None:
        raise ConfigError(f"{where}: split {split!r} is not a key of data_files ({', '.join(data_files)})")
    row = _first_row(config, file if isinstance(file, str) else file[0])
    if row is None:
        if config.get("dataset_path") in ("json", "csv"):
            raise DataError(f"{where}: data file {file} has no rows")
        return
    columns = set(row)
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        template = config.get(key)
        unknown = _template_variables(template) - columns
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"{where}: {key} uses {{{{{name}}}}}, which is not a column of {file}; {did_you_mean(name, columns)}columns: {', '.join(sorted(columns))}")
        if key == "doc_to_target" and isinstance(template, str) and template.isidentifier() and template not in columns:
            raise ConfigError(f"{where}: doc_to_target names column {template!r}, which {file} does not have; {did_you_mean(template, columns)}columns: {', '.join(sorted(columns))}")


def load_task_file(path: str | os.PathLike, data_dir: str | os.PathLike) -> TaskSpec:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist; pass a task YAML, or one of: {', '.join(shipped_tasks())}")
    config = _read_yaml(path)
    _resolve_data_files(config, Path(data_dir).expanduser().resolve(), path.parent)
    check_task(config, f"task {config.get('task') or path.stem} ({path})")
    return TaskSpec(str(config["task"]), config, str(path))


def resolve_tasks(names: list[str], data_dir: str | os.PathLike | None = None) -> list[TaskSpec]:
    """Shipped name → its YAML; ``*.yaml`` or an existing file → a user's YAML; anything else → lm-eval's
    registry (checked there, with its own did-you-mean)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"task {name!r} is named twice in tasks")
    specs = []
    for name in names:
        if name in shipped_tasks():
            specs.append(load_task_file(TASKS_DIR / f"{name}.yaml", data_dir))
        elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
            specs.append(load_task_file(name, data_dir))
        else:
            specs.append(TaskSpec(name, None, "lm-eval"))
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"task {spec.name!r} is named twice in tasks")
        seen.add(spec.name)
    return specs


def _hub_task(name: str):
    """An lm-eval registry task (downloads its data): the full task index is only built for these."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    if name not in manager.all_tasks:
        shipped = shipped_tasks()
        raise ConfigError(f"unknown task {name!r}; {did_you_mean(name, shipped + list(manager.all_tasks))}shipped tasks: {', '.join(shipped)}; or pass a task YAML")
    return manager


def _summarise(name: str, raw: dict, samples: int | None, num_fewshot) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` → ``{"metrics": {"acc": {"value", "stderr"}}}``;
    a filter other than ``none`` is kept in the name (``exact_match,strict-match``)."""
    metrics = {}
    for key, value in raw.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else f"{metric},{filt}"
        stderr = raw.get(f"{metric}_stderr,{filt}")
        metrics[label] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return {"task": name, "metrics": metrics, "samples": samples, "num_fewshot": num_fewshot, "primary": primary_metric(metrics)}


def primary_metric(metrics: dict) -> str | None:
    for want in PRIMARY_METRICS:
        for label in metrics:
            if label == want or label.startswith(want + ","):
                return label
    return next(iter(metrics), None)


def quiet_lm_eval() -> None:
    import logging

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_task(lm, spec: TaskSpec, limit: int | None, num_fewshot: int | None) -> dict:
    """Score one task with lm-eval's ``simple_evaluate`` (seeded: the same model gives the same numbers)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    if spec.config is None:
        manager, task = _hub_task(spec.name), spec.name
    else:
        manager, task = TaskManager(include_defaults=False), dict(spec.config)
    try:
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        # a template that lm-eval could not apply to a row, a label outside the choices, ...
        raise ConfigError(f"task {spec.name} ({spec.source}) failed inside lm-eval ({type(exc).__name__}: {exc}); check its YAML against the data") from None
    (name, raw), = out["results"].items()
    n = (out.get("n-samples") or {}).get(name, {}).get("effective")
    shots = (out.get("configs") or {}).get(name, {}).get("num_fewshot")
    return _summarise(spec.name, raw, n, shots)


def make_lm(model, tokenizer, batch_size: int = 16):
    """lm-eval's HF wrapper around a model already in memory (no hub, no reload)."""
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    import logging

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str" warning
    from ..quantize.serialization import is_quantized

    if not is_quantized(model):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # HFLM calls model.tie_weights(); a packed quantized embedding has no .weight to tie (the tying was
    # settled when the model was quantized), so the call is skipped for this one construction.
    model.tie_weights = lambda *args, **kwargs: None
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        del model.tie_weights


def evaluate_tasks(model, tokenizer, specs: list[TaskSpec], limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                   cache_dir: str | os.PathLike | None = None, model_fingerprint: str | None = None, on_task=None) -> dict:
    """``{task: summary}`` for every spec; with ``cache_dir`` and ``model_fingerprint`` a task scored before
    with the same (model, definition, limit, few-shot) is read back instead of run again."""
    import lm_eval

    results, lm = {}, None
    for i, spec in enumerate(specs):
        key = hashlib.sha256(json.dumps([model_fingerprint, spec.fingerprint(), limit, num_fewshot, lm_eval.__version__]).encode()).hexdigest()[:20]
        cached = Path(cache_dir) / f"task-{spec.name.replace('/', '_')}-{key}.json" if cache_dir and model_fingerprint else None
        if on_task:
            on_task(spec.name, i, len(specs))
        if cached is not None and cached.is_file():
            results[spec.name] = json.loads(cached.read_text())
            continue
        if lm is None:
            lm = make_lm(model, tokenizer, batch_size)
        results[spec.name] = run_task(lm, spec, limit, num_fewshot)
        if cached is not None:
            from ..artifact import write_atomic

            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, json.dumps(results[spec.name]))
    return results


def answer_filters(config: dict) -> dict:
    """``{filter name: function(completion) -> extracted answer}`` built by lm-eval from a task's
    ``filter_list``, so the answer extraction can be checked on completions without a model."""
    from lm_eval.filters import build_filter_ensemble

    filters = {}
    for entry in config.get("filter_list") or []:
        components = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in entry["filter"]]
        ensemble = build_filter_ensemble(entry["name"], components)

        def apply(completion: str, ensemble=ensemble) -> str:
            responses = [[completion]]  # one document, one sampled completion
            for make_filter in ensemble.filters:
                responses = list(make_filter().apply(responses, [{}]))
            return responses[0]

        filters[entry["name"]] = apply
    return filters
