"""Evaluate: what each model costs (parameters, bytes on disk, peak memory, speed) and what it is still
worth (perplexity on held-out text, answers to a few fixed prompts), side by side in one report.

``evaluate`` measures one model in this process and writes nothing. ``evaluate_dirs`` is what a recipe's
``evaluate`` stage runs: every saved model is measured in its own subprocess, so each peak-memory number
belongs to that model alone, and then ``report.md``, ``report.json`` and ``pareto.png`` are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import field
from ..errors import ConfigError, MinigiantError

SPEED_PROMPT_TOKENS = 128  # prompt length for the speed test, taken from the start of the evaluation text


@dataclass
class EvaluateConfig:
    text: str = field("corpus:heldout", help="perplexity text spec: corpus[:train|heldout] or a .txt file/folder")
    window: int = field(1024, help="tokens per perplexity window (windows do not overlap and share no context)")
    max_windows: int = field(8, help="score at most this many windows from the start of the text")
    prompts: bool = field(True, help="answer the fixed prompts (shown side by side in the report)")
    max_new_tokens: int = field(48, help="longest answer to each fixed prompt, in tokens")
    speed_tokens: int = field(64, help="tokens to generate when timing decoding (0: skip the speed test)")

    def validate(self, path: str) -> None:
        if self.window < 2:
            raise ConfigError(f"{path}.window: must be at least 2 (one token predicts the next), got {self.window}")
        for name in ("max_windows", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if self.speed_tokens != 0 and self.speed_tokens < 2:
            raise ConfigError(f"{path}.speed_tokens: must be 0 (skip) or at least 2 (a first token, then decoding), got {self.speed_tokens}")


def evaluate(model, tokenizer, config: EvaluateConfig | None = None, model_dir: str | os.PathLike | None = None) -> dict:
    """All metrics of one model, as a flat JSON-serialisable dict (see the module doc). ``model_dir``, the
    directory the model was loaded from, adds its size on disk; without it ``disk_bytes`` is None.

    ``peak_rss_mb`` is this process's high-water mark, so it belongs to the model alone only in a fresh
    process (``evaluate_dirs`` runs one per model).
    """
    from .. import artifact
    from ..data.text import load_documents, tokenize_documents
    from .efficiency import decode_speed, parameter_counts, peak_rss_mb
    from .perplexity import count_windows, perplexity
    from .prompts import answer_all

    config = config or EvaluateConfig()
    config.validate("evaluate")
    docs = load_documents(config.text)
    ids = tokenize_documents(tokenizer, docs, max_tokens=config.window * config.max_windows + 1)
    count_windows(ids.numel(), config.window, config.max_windows)  # a too-short text fails before the slow parts

    saved = artifact.read_lineage(model_dir) if model_dir is not None else None
    lineage = saved or getattr(model, "minigiant_lineage", None) or {}
    result = {
        "path": str(model_dir) if model_dir is not None else None,
        "lineage_stages": [entry.get("stage") for entry in lineage.get("stages", [])],
        **parameter_counts(model),
        "disk_bytes": artifact.weights_size_bytes(model_dir) if model_dir is not None else None,
        "ttft_s": None,
        "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None,
    }
    if config.speed_tokens:
        speed = decode_speed(model, ids[:SPEED_PROMPT_TOKENS], config.speed_tokens)
        result.update({k: speed[k] for k in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")})
    result["answers"] = answer_all(model, tokenizer, config.max_new_tokens) if config.prompts else []
    # Read before perplexity: its window × vocabulary logits would set the peak for a small model, and
    # what a user needs to know is the memory to load the model and generate with it.
    result["peak_rss_mb"] = peak_rss_mb()
    scored = perplexity(model, ids, config.window, config.max_windows)
    result.update({"perplexity": scored["ppl"], "ppl_tokens": scored["tokens"]})
    return result


def _package_root() -> str:
    """The folder holding the ``minigiant`` package, so the worker imports this same copy of it."""
    return str(Path(__file__).resolve().parents[2])


def _run_worker(name: str, model_dir: Path, config: EvaluateConfig) -> dict:
    env = dict(os.environ, MINIGIANT_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "minigiant.evaluate.worker", str(model_dir), json.dumps(dataclasses.asdict(config))]
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        # A killed worker's last stderr line is whatever it printed before (a library warning, say), not
        # the reason: seen when the kernel's OOM killer ended one of the default run's workers.
        lines = [line for line in finished.stderr.splitlines() if line.strip()]
        if finished.returncode < 0:
            reason = f"killed by signal {-finished.returncode} (out of memory?)"
        elif lines:
            reason = lines[-1].strip()
        else:
            reason = f"exit status {finished.returncode}"
        raise MinigiantError(f"evaluating {name} ({model_dir}) failed: {reason}")
    lines = finished.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise MinigiantError(f"evaluating {name} ({model_dir}) printed no result line; rerun with MINIGIANT_DEBUG=1") from None


def _cache_key(model_dir: Path, config: EvaluateConfig) -> str:
    """Same model files and settings → same key (a rerun of a recipe re-measures only what changed)."""
    import hashlib

    from .. import artifact

    lineage = artifact.read_lineage(model_dir) if model_dir.is_dir() else None
    weights = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else [model_dir]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    return hashlib.sha256(json.dumps([lineage, stamp, dataclasses.asdict(config)], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_dirs(models: dict[str, str | os.PathLike], config: EvaluateConfig | None = None, out_dir: str | os.PathLike = "evaluation", title: str | None = None, overwrite: bool = False) -> list[dict]:
    """Evaluate each saved model directory (``{name: dir}``, the first is the reference for ratios) in its
    own subprocess, write the report into ``out_dir`` and return one result dict per model, in order.

    ``out_dir`` must be new, empty, an earlier report or run folder, or ``overwrite=True`` (see
    ``artifact.check_output``); it may not be or hold one of the models."""
    from .. import artifact

    config = config or EvaluateConfig()
    config.validate("evaluate")  # before starting a worker per model
    from ..data.text import text_paths

    inputs = [*models.values(), *text_paths(config)]
    artifact.check_output(out_dir, "report", inputs=inputs, overwrite=overwrite, replaces=("report", "run"))
    return measure_and_report(models, config, out_dir, title)


def measure_and_report(models: dict[str, str | os.PathLike], config: EvaluateConfig, out_dir: str | os.PathLike, title: str | None = None) -> list[dict]:
    """``evaluate_dirs`` without the output check, for a caller that checked ``out_dir`` itself (a recipe
    run writes its report into its own run folder, beside the models it measures)."""
    from ..artifact import write_atomic, writing
    from ..progress import progress
    from .report import write_report

    config.validate("evaluate")
    out_dir = Path(out_dir)
    results = []
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(models), info="")
        cache = out_dir / ".evaluate-cache"
        for name, model_dir in models.items():
            bar.update(task, info=name)
            cached = cache / f"{_cache_key(Path(model_dir), config)}.json"
            if cached.is_file():
                result = json.loads(cached.read_text())
            else:
                result = _run_worker(name, Path(model_dir), config)
                with writing(out_dir):
                    cache.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, json.dumps(result))
            results.append({"name": name, **result})
            bar.advance(task)
        bar.update(task, info="")
    write_report(results, out_dir, title or f"minigiant evaluation: {out_dir.resolve().name}")
    return results


__all__ = ["EvaluateConfig", "evaluate", "evaluate_dirs"]
