"""Evaluate: what each model costs (parameters, bytes on disk, peak memory, speed) and what it is still
worth: perplexity on held-out text, standard benchmarks through lm-evaluation-harness (``harness``),
agreement with the teacher (``agreement``) and chat quality judged by the teacher (``chat``), side by
side in one report.

``evaluate`` measures one model in this process and writes nothing. ``evaluate_dirs`` is what a recipe's
``evaluate`` stage runs: every saved model is measured in its own subprocess, so each peak-memory number
belongs to that model alone, and then ``report.md``, ``report.json``, ``report.html`` and the plots are
written. The first model is the reference (the teacher in a recipe): it judges the chat answers and the
others' agreement is measured against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..config import field
from ..errors import ConfigError, MinigiantError

SPEED_PROMPT_TOKENS = 128  # prompt length for the speed test, taken from the start of the evaluation text


@dataclass
class EvaluateConfig:
    text: str = field("corpus:heldout", help="perplexity text spec: corpus[:train|heldout] or a .txt file/folder")
    window: int = field(1024, help="tokens per perplexity window (windows do not overlap and share no context)")
    max_windows: int = field(8, help="score at most this many windows from the start of the text")
    prompts: bool = field(True, help="answer the instructions (chat metrics, answers side by side in the report)")
    max_new_tokens: int = field(64, help="longest answer to each instruction, in tokens (an answer that reaches it is counted as truncated)")
    speed_tokens: int = field(64, help="tokens to generate when timing decoding (0: skip the speed test)")
    tasks: Union[list[str], str] = field([], help="lm-evaluation-harness tasks, comma-separated: shipped ones (hellaswag, arc_easy, arc_challenge, piqa, boolq, winogrande, sst2, gsm8k), a task YAML path, or an lm-eval task name (online)")
    limit: Optional[int] = field(None, help="score at most this many examples per task, from the start of its file (null: all)")
    data_dir: Optional[str] = field(None, help="folder holding the shipped tasks' data files (hellaswag/dev.jsonl, ...); null: $MINIGIANT_DATA or ./data")
    num_fewshot: Optional[int] = field(None, help="few-shot examples for every task (null: each task's own, e.g. 5 for gsm8k)")
    batch_size: int = field(16, help="lm-eval batch size (requests scored per forward pass)")
    agreement_windows: int = field(4, help="windows of the evaluation text on which to measure agreement with the first model, the teacher (0: skip)")
    instructions: str = field("builtin", help="held-out instructions for the chat metrics: 'builtin' (64 shipped prompts, the first max_instructions of them) or a JSONL file with an 'instruction' field per line")
    max_instructions: int = field(32, help="answer at most this many instructions (answered 16 at a time; the chat NLL's standard error shrinks as 1/sqrt of this)")

    def validate(self, path: str) -> None:
        if self.window < 2:
            raise ConfigError(f"{path}.window: must be at least 2 (one token predicts the next), got {self.window}")
        if isinstance(self.tasks, str):  # the CLI gives "hellaswag,arc_easy"
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{path}.limit: must be at least 1 (or null for every example), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"{path}.num_fewshot: must be 0 or more (or null), got {self.num_fewshot}")
        if self.agreement_windows < 0:
            raise ConfigError(f"{path}.agreement_windows: must be 0 (skip) or more, got {self.agreement_windows}")
        for name in ("max_windows", "max_new_tokens", "batch_size", "max_instructions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.speed_tokens != 0 and self.speed_tokens < 2:
            raise ConfigError(f"{path}.speed_tokens: must be 0 (skip) or at least 2 (a first token, then decoding), got {self.speed_tokens}")


def distill_curve(lineage: dict) -> list | None:
    """The held-out perplexity curve ``[[minutes, step, ppl], ...]`` of the model's last distillation (its
    ``eval_every`` setting), or None."""
    for entry in reversed(lineage.get("stages", [])):
        if entry.get("stage") == "distill":
            return (entry.get("metrics") or {}).get("eval_curve") or None
    return None


def evaluate(model, tokenizer, config: EvaluateConfig | None = None, model_dir: str | os.PathLike | None = None, teacher=None,
             cache_dir: str | os.PathLike | None = None, model_fingerprint: str | None = None, on_step=None,
             teacher_logits: str | os.PathLike | None = None) -> dict:
    """All metrics of one model, as a flat JSON-serialisable dict (see the module doc). ``model_dir``, the
    directory the model was loaded from, adds its size on disk; without it ``disk_bytes`` is None.
    ``teacher`` (a model, or a function returning one; default: the model itself) is the reference for
    agreement and the judge of chat answers.
    With ``cache_dir`` and ``model_fingerprint`` each lm-eval task result is cached. ``on_step(text)`` is
    told what is being measured. ``teacher_logits``: a folder in which the teacher's agreement logits are
    shared between the evaluations of one report (``agreement.Agreement``).

    ``peak_rss_mb`` is this process's high-water mark, so it belongs to the model alone only in a fresh
    process (``evaluate_dirs`` runs one per model); it is read before the benchmarks and before the
    teacher is used.
    """
    from .. import artifact
    from ..data.text import load_documents, tokenize_documents
    from .efficiency import decode_speed, parameter_counts, peak_rss_mb
    from .perplexity import count_windows, perplexity

    config = config or EvaluateConfig()
    config.validate("evaluate")
    step = on_step or (lambda text: None)
    specs = None
    if config.tasks:  # a bad task file fails before the slow parts
        from .harness import resolve_tasks

        specs = resolve_tasks(config.tasks, config.data_dir)
    prompts = None
    if config.prompts:
        from .chat import load_instructions

        prompts = load_instructions(config.instructions, config.max_instructions)
    docs = load_documents(config.text)
    windows = max(config.max_windows, config.agreement_windows)
    ids = tokenize_documents(tokenizer, docs, max_tokens=config.window * windows + 1)
    count_windows(ids.numel(), config.window, config.max_windows)  # a too-short text fails before the slow parts

    saved = artifact.read_lineage(model_dir) if model_dir is not None else None
    lineage = saved or getattr(model, "minigiant_lineage", None) or {}
    result = {
        "path": str(model_dir) if model_dir is not None else None,
        "lineage_stages": [entry.get("stage") for entry in lineage.get("stages", [])],
        "distill_curve": distill_curve(lineage),
        **parameter_counts(model),
        "disk_bytes": artifact.weights_size_bytes(model_dir) if model_dir is not None else None,
        "ttft_s": None,
        "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None,
    }
    if result["disk_bytes"]:
        result["bits_per_weight"] = 8 * result["disk_bytes"] / result["params"]
    if config.speed_tokens:
        step("speed")
        speed = decode_speed(model, ids[:SPEED_PROMPT_TOKENS], config.speed_tokens)
        result.update({k: speed[k] for k in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")})
    # Read before perplexity, the benchmarks and the teacher: what a user needs to know is the memory to
    # load the model and generate with it, not that of a window × vocabulary logits tensor or a second model.
    result["peak_rss_mb"] = peak_rss_mb()
    if teacher is not None and not hasattr(teacher, "forward"):
        step("loading the teacher")
        teacher = teacher()  # a loader: the worker loads the teacher only now, after the peak was read
    judge = teacher if teacher is not None else model
    # Agreement is measured on the first perplexity windows, from the logits the perplexity pass computed.
    meter, shared = None, config.agreement_windows and config.agreement_windows <= config.max_windows
    if config.agreement_windows:
        from .agreement import Agreement, teacher_agreement

        meter = Agreement(judge, model, teacher_logits)
    step("perplexity and teacher agreement" if shared else "perplexity")
    on_window = (lambda i, chunk, logits: meter.add(chunk, logits, i) if i < config.agreement_windows else None) if shared else None
    scored = perplexity(model, ids, config.window, config.max_windows, on_window=on_window)
    result.update({"perplexity": scored["ppl"], "ppl_tokens": scored["tokens"]})
    if shared:
        result.update(meter.result())
    elif config.agreement_windows:
        step("teacher agreement")
        result.update(teacher_agreement(model, judge, ids, config.window, config.agreement_windows))
    result["answers"] = []
    if prompts:
        from .chat import chat_quality

        step("chat")
        chat = chat_quality(model, tokenizer, judge, prompts, config.max_new_tokens)
        result["answers"] = chat.pop("chat_answers")
        result.update(chat)
    result["tasks"] = {}
    if specs:
        from .harness import evaluate_tasks

        result["tasks"] = evaluate_tasks(
            model, tokenizer, specs, config.limit, config.num_fewshot, config.batch_size, cache_dir, model_fingerprint,
            on_task=lambda name, i, n: step(f"{name} ({i + 1}/{n})"),
        )
    return result


def _package_root() -> str:
    """The folder holding the ``minigiant`` package, so the worker imports this same copy of it."""
    return str(Path(__file__).resolve().parents[2])


def _run_worker(name: str, model_dir: Path, config: EvaluateConfig, options: dict, on_step=None) -> dict:
    """Evaluate one model in a fresh process; its ``@step`` lines on stdout report progress, its last
    stdout line is the result and, on failure, its last stderr line the reason."""
    import tempfile

    env = dict(os.environ, MINIGIANT_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "minigiant.evaluate.worker", str(model_dir), json.dumps(dataclasses.asdict(config)), json.dumps(options)]
    lines = []
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        for line in process.stdout:
            if line.startswith("@step ") and on_step is not None:
                on_step(line[6:].strip())
            else:
                lines.append(line)
        returncode = process.wait()
        errors.seek(0)
        stderr = errors.read()
    if returncode != 0:
        # A killed worker's last stderr line is whatever it printed before (a library warning, say), not
        # the reason: seen when a worker of the default run was killed.
        last = [line for line in stderr.splitlines() if line.strip()]
        if returncode < 0:
            reason = f"killed by signal {-returncode} (out of memory?)"
        elif last:
            reason = last[-1].strip()
        else:
            reason = f"exit status {returncode}"
        raise MinigiantError(f"evaluating {name} ({model_dir}) failed: {reason}")
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise MinigiantError(f"evaluating {name} ({model_dir}) printed no result line; rerun with MINIGIANT_DEBUG=1") from None


def model_fingerprint(model_dir: Path) -> str:
    """Same lineage and weight files (path, size, modification time) → same fingerprint."""
    import hashlib

    from .. import artifact

    lineage = artifact.read_lineage(model_dir) if model_dir.is_dir() else None
    weights = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else [model_dir]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    return hashlib.sha256(json.dumps([lineage, stamp], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_key(model_dir: Path, config: EvaluateConfig, teacher_dir: Path) -> str:
    """Same model files, teacher and settings → same key (a rerun of a recipe re-measures only what changed)."""
    import hashlib

    parts = [model_fingerprint(model_dir), model_fingerprint(teacher_dir), dataclasses.asdict(config)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_dirs(models: dict[str, str | os.PathLike], config: EvaluateConfig | None = None, out_dir: str | os.PathLike = "evaluation",
                  title: str | None = None, workers: int = 1, reference: str | os.PathLike | None = None, overwrite: bool = False) -> list[dict]:
    """Evaluate each saved model directory (``{name: dir}``, the first is the reference for ratios) in its
    own subprocess (``workers`` at a time; speed numbers are only comparable with 1), write the report into
    ``out_dir`` and return one result dict per model, in order. ``reference``: the teacher directory for
    agreement and the chat judge when it is not the first model (to evaluate students apart from it).

    ``out_dir`` must be new, empty, an earlier report or run folder, or ``overwrite=True`` (see
    ``artifact.check_output``); it may not be or hold one of the models."""
    from .. import artifact
    from ..data.text import text_paths

    config = config or EvaluateConfig()
    config.validate("evaluate")  # before starting a worker per model
    inputs = [*models.values(), *text_paths(config)]
    artifact.check_output(out_dir, "report", inputs=inputs, overwrite=overwrite, replaces=("report", "run"))
    return measure_and_report(models, config, out_dir, title, workers, reference)


CACHE = ".evaluate-cache"  # in the report's folder: one file of measurements per model, keyed by what they depend on


def _reference(models: dict, reference) -> Path | None:
    """The model that judges chat answers and agreement: ``reference``, else the first model."""
    return Path(reference) if reference is not None else Path(next(iter(models.values()))) if models else None


def _cache_file(out_dir: Path, model_dir: Path, config: EvaluateConfig, teacher_dir: Path | None) -> Path:
    """Where ``measure_and_report`` keeps (and looks for) one model's measurements."""
    return out_dir / CACHE / f"{_cache_key(model_dir, config, teacher_dir)}.json"


def all_cached(models: dict[str, str | os.PathLike], config: EvaluateConfig, out_dir: str | os.PathLike, reference: str | os.PathLike | None = None) -> bool:
    """Whether ``measure_and_report`` would find every model's measurements in ``out_dir``'s cache (a rerun
    of a finished run), so that it only rewrites the report."""
    teacher_dir = _reference(models, reference)
    return all(_cache_file(Path(out_dir), Path(d), config, teacher_dir).is_file() for d in models.values())


@contextlib.contextmanager
def _removed_after(path: Path | None):
    try:
        yield
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def measure_and_report(models: dict[str, str | os.PathLike], config: EvaluateConfig, out_dir: str | os.PathLike, title: str | None = None,
                       workers: int = 1, reference: str | os.PathLike | None = None) -> list[dict]:
    """``evaluate_dirs`` without the output check, for a caller that checked ``out_dir`` itself (a recipe
    run writes its report into its own run folder, beside the models it measures)."""
    from ..artifact import write_atomic, writing
    from ..progress import progress
    from .report import write_report

    config.validate("evaluate")
    if config.tasks:  # a bad task file or a missing data file fails before any model is loaded
        from .harness import resolve_tasks

        resolve_tasks(config.tasks, config.data_dir)
    if config.prompts:
        from .chat import load_instructions

        load_instructions(config.instructions, config.max_instructions)
    out_dir = Path(out_dir)
    teacher_dir = _reference(models, reference)
    cache = out_dir / CACHE
    # The teacher's agreement logits, written by its own evaluation and read by the students' (removed at the
    # end: ~200 MB per 1024-token window of the default vocabulary).
    shared_logits = cache / f"teacher-logits-{model_fingerprint(teacher_dir)}" if teacher_dir is not None else None
    results: dict[str, dict] = {}
    with progress() as bar, _removed_after(shared_logits):
        task = bar.add_task("evaluate", total=len(models), info="")

        def measure(name: str, model_dir) -> None:
            cached = _cache_file(out_dir, Path(model_dir), config, teacher_dir)
            if cached.is_file():
                result = json.loads(cached.read_text())
            else:
                options = {"teacher": str(teacher_dir), "cache_dir": str(cache), "fingerprint": model_fingerprint(Path(model_dir)),
                           "teacher_logits": str(shared_logits) if shared_logits is not None else None}
                result = _run_worker(name, Path(model_dir), config, options, on_step=lambda text: bar.update(task, info=f"{name}: {text}"))
                with writing(out_dir):
                    cache.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, json.dumps(result))
            results[name] = {"name": name, **result}
            bar.advance(task)

        if workers <= 1:
            for name, model_dir in models.items():
                measure(name, model_dir)
        else:
            # On a CPU shared with other jobs, several single-threaded workers get more of it than one.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                for future in [pool.submit(measure, name, d) for name, d in models.items()]:
                    future.result()
        bar.update(task, info="")
    results = [results[name] for name in models]
    write_report(results, out_dir, title or f"minigiant evaluation: {out_dir.resolve().name}")
    return results


__all__ = ["EvaluateConfig", "evaluate", "evaluate_dirs"]
