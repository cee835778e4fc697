"""A model on disk: a plain Hugging Face directory plus ``minigiant.json`` (its lineage).

Lineage travels with the in-memory model as the attribute ``minigiant_lineage`` (a plain dict), so the
model stays a plain ``PreTrainedModel`` and every verb can append the stage it applied.
Directories are written atomically: into a hidden temp dir beside the target, then renamed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

LINEAGE_FILE = "minigiant.json"
FORMAT = "minigiant/1"


def lineage(model) -> dict:
    """The model's lineage dict (created empty on first use)."""
    if getattr(model, "minigiant_lineage", None) is None:
        model.minigiant_lineage = {"format": FORMAT, "source": None, "stages": []}
    return model.minigiant_lineage


def record_stage(model, stage: str, settings: dict, metrics: dict | None = None) -> dict:
    entry = {
        "stage": stage,
        "settings": settings,
        "metrics": metrics or {},
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    lineage(model)["stages"].append(entry)
    return entry


def read_lineage(path: str | os.PathLike) -> dict | None:
    file = Path(path) / LINEAGE_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file via a temp file beside it and a rename: a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces ``path`` in one rename, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save(model, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` (float or quantized), its tokenizer and lineage to ``path`` atomically."""
    from .progress import quiet_transformers
    from .quantize.serialization import is_quantized, save_quantized

    quiet_transformers()
    path = Path(path)
    with atomic_dir(path) as tmp:
        if is_quantized(model):
            save_quantized(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage(model), indent=2, default=str))
    return path


def weights_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model directory (what a user downloads or keeps in memory-mapped form)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
