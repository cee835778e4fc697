"""A model on disk: a plain Hugging Face directory plus ``minigiant.json`` (its lineage).

Lineage travels with the in-memory model as the attribute ``minigiant_lineage`` (a plain dict), so the
model stays a plain ``PreTrainedModel`` and every verb can append the stage it applied.

Writing is where a user can lose data, so every writer (``save``, a recipe run, an evaluation report) goes
through the same two steps here:

1. ``check_output``, before any slow work: an output that is an input, lies inside one or contains one is
   refused; an existing path is replaced only when it is a previous minigiant output of the same kind (a
   model made by the same stage, a run folder, a report folder), anything else — a folder of the user's
   files, a plain file, a model made by another stage — only with ``overwrite``; and the folder that will
   receive the output must accept a new entry (probed by making one, which also catches root on a read-only
   or immutable folder, where ``os.access`` says yes).
2. The write itself: model directories go to a hidden temp dir beside the target and are renamed into place
   only when complete (``atomic_dir``), files via a temp file (``write_atomic``); a permission, read-only or
   disk-full error becomes one ``OutputError`` naming the path.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError

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


# What an OS error means when it happens while writing an output: the user can act on these.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a permission, read-only or disk-full error raised inside into one ``OutputError`` naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != Path(path) else ""
        raise OutputError(f"could not write {path}: {exc.strerror or exc}{where}; choose another output or fix its permissions / free space") from exc


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file via a temp file beside it and a rename: a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            if isinstance(data, str):
                tmp.write_text(data, encoding="utf-8")
            else:
                tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def _remove_stale_temp_dirs(path: Path) -> None:
    """Delete ``.NAME.tmp-PID`` dirs left by a writer that was killed (its PID no longer runs): they are
    incomplete outputs by construction. ``.old-`` dirs are kept: one may hold the only copy of a previous
    output if a process died between the two renames."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces ``path`` in one rename, on error it is deleted.

    A previous ``path`` (folder or file) is moved aside first and deleted only after the new one is in
    place. This is a primitive: callers that may replace something a user owns call ``check_output`` first.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with writing(path):
            yield tmp
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        with writing(path):
            moved = False
            if path.exists() or path.is_symlink():
                _remove(old)
                os.replace(path, old)
                moved = True
            try:
                os.replace(tmp, path)
            except BaseException:
                if moved:
                    os.replace(old, path)  # put the previous output back
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)


# ---- the output rule: what may be written where ----------------------------------------------------------

RUN_HEADER = "# minigiant run: the resolved recipe of this run folder (rerun it with `minigiant run THIS_FILE`)\n"


def _kind_of(lineage_dict: dict) -> str:
    """``model/<stage>``, named by the last stage a lineage records (``model/model`` for none)."""
    stages = lineage_dict.get("stages") or []
    return "model/" + (stages[-1].get("stage") or "model" if stages else "model")


def model_kind(model) -> str:
    """The kind of output ``save`` makes of ``model`` (see ``_kind_of``)."""
    return _kind_of(lineage(model))


def _is_run(path: Path) -> bool:
    recipe = path / "recipe.yaml"
    if not recipe.is_file():
        return False
    with open(recipe, encoding="utf-8", errors="replace") as f:
        if f.readline() == RUN_HEADER:
            return True
    return (path / "00-teacher" / LINEAGE_FILE).is_file()  # a run made before the header existed


def _is_report(path: Path) -> bool:
    if (path / ".evaluate-cache").is_dir():
        return True
    try:
        return "models" in json.loads((path / "report.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def output_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path``: None (nothing, or an empty folder), ``file``, ``link``, ``folder`` (not made by
    minigiant), ``run``, ``report``, or ``model/<stage>`` (a minigiant model directory)."""
    path = Path(path)
    if path.is_symlink():
        return "link"
    if not path.exists():
        return None
    if not path.is_dir():
        return "file"
    if (path / LINEAGE_FILE).is_file():
        try:
            return _kind_of(json.loads((path / LINEAGE_FILE).read_text()))
        except (OSError, ValueError, AttributeError):
            return "folder"
    if _is_run(path):
        return "run"
    if _is_report(path):
        return "report"
    if not any(path.iterdir()):
        return None
    return "folder"


def describe(kind: str) -> str:
    if kind.startswith("model/"):
        stage = kind.partition("/")[2]
        return "a model saved by minigiant" if stage == "model" else f"a model made by minigiant {stage}"
    return {
        "file": "a file", "link": "a symbolic link", "folder": "a folder of other files",
        "run": "a minigiant run folder", "report": "a minigiant evaluation report folder",
    }.get(kind, kind)


def _matches(existing: str, kinds: Iterable[str]) -> bool:
    """``model`` matches every ``model/<stage>``; other kinds match themselves."""
    return any(existing == k or existing.startswith(k + "/") for k in kinds)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path, into: bool) -> None:
    """The folder that will receive ``path`` (and ``path`` itself when the output is written into it) must
    accept a new entry. Probed by making one: root passes ``os.access`` on read-only mounts and immutable
    folders, where a real write fails."""
    folders = [_nearest_existing(path.parent)]
    if into and path.is_dir():
        folders.append(path)
    for folder in folders:
        if not folder.is_dir():
            raise OutputError(f"cannot create {path}: {folder} is a file, not a folder; choose another output")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".minigiant-write-test-", dir=folder))
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {folder} is not writable ({exc.strerror}); choose another output or fix its permissions") from exc


def check_output(path: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False, replaces: Iterable[str] | None = None) -> str | None:
    """Refuse (``OutputError``) to write ``kind`` (``model/<stage>``, ``run`` or ``report``) to ``path``
    where it could lose data, before any slow work (see the module doc). Returns a one-line note when an
    existing output will be replaced (for the CLI to show), else None.

    ``inputs`` are the paths the command reads; ``replaces`` the existing kinds that may be replaced
    without ``overwrite`` (default: ``kind`` itself; ``model`` stands for a model made by any stage).
    """
    path = Path(path).expanduser()
    target = path.resolve()
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if source_path == target:
            raise OutputError(f"the output {path} is the input {source}; choose another output path")
        if target.is_relative_to(source_path):
            raise OutputError(f"the output {path} lies inside the input {source}; choose an output outside it")
        if source_path.is_relative_to(target):
            raise OutputError(f"the input {source} lies inside the output {path}; choose an output that does not contain it")
    replaces_folder = kind.startswith("model")  # a run or a report is written into its folder, a model replaces it
    if replaces_folder and (Path.cwd().resolve().is_relative_to(target) or target == Path.home().resolve()):
        raise OutputError(f"refusing to replace {path}: it is the current folder, one of its parents, or your home folder; name a new folder")
    existing = output_kind(path)
    note = None
    if existing is not None:
        if _matches(existing, replaces or (kind,)):
            if kind == "run":
                note = f"{path} holds an earlier minigiant run; stages whose settings did not change are reused"
            elif kind == "report":
                note = f"{path} holds an earlier report ({describe(existing)}); its report files (report.md, .json, .html and the plots) will be replaced"
            else:
                note = f"{path} holds an earlier output ({describe(existing)}); it will be replaced once the new one is complete"
        elif not overwrite:
            wanted = f"a {kind.partition('/')[2]} output" if kind.startswith("model/") else describe(kind)
            raise OutputError(f"{path} already exists and is {describe(existing)}, not {wanted}; pass --overwrite to replace it, or choose another output")
        elif replaces_folder:
            note = f"{path} ({describe(existing)}) will be replaced, as --overwrite asks"
        else:
            note = f"writing into {path} ({describe(existing)}) as --overwrite asks; files of the same names are replaced"
    _check_writable(path, into=not replaces_folder)
    return note


def save(model, tokenizer, path: str | os.PathLike, *, overwrite: bool = False, replaces: Iterable[str] | None = None) -> Path:
    """Write ``model`` (float or quantized), its tokenizer and lineage to ``path`` atomically.

    An existing ``path`` is replaced only when it is a model made by the same stage (``replaces`` widens
    that), or with ``overwrite=True`` (see ``check_output``)."""
    from .progress import quiet_transformers
    from .quantize.serialization import is_quantized, save_packed, sparse_matrices

    from .hardware import process_rank

    quiet_transformers()
    path = Path(path)
    if process_rank() != 0:  # data-parallel training: every process holds the same model, process 0 writes it
        return path
    check_output(path, model_kind(model), overwrite=overwrite, replaces=replaces)
    with atomic_dir(path) as tmp:
        record = lineage(model)
        record.pop("shared_layers", None)
        record.pop("sparse_storage", None)
        record.pop("mlp_widths", None)
        from .models.architecture import mlp_widths

        widths = mlp_widths(model)
        if widths:  # per-layer MLP widths (prune.profile): config.json holds the widest, minigiant.load builds each
            record["mlp_widths"] = widths
        from .prune.share import duplicate_keys, shared_pairs

        quantized = is_quantized(model)
        pairs = [] if quantized else shared_pairs(model)  # quantizing unties shared layers
        if quantized or widths or sparse_matrices(model.state_dict()):
            # our own weights file: packed quantized modules, sparse matrices as mask + values, ties as aliases
            # (and per-layer MLP widths, which from_pretrained cannot build anyway)
            sparse = save_packed(model, tmp)
            if sparse:
                record["sparse_storage"] = sparse
            if pairs:
                record["shared_layers"] = [list(p) for p in pairs]
        else:
            if pairs:  # cross-layer sharing: each shared tensor once on disk, the pairs in the lineage
                skip = duplicate_keys(model, pairs)
                model.save_pretrained(tmp, safe_serialization=True, state_dict={k: v for k, v in model.state_dict().items() if k not in skip})
                record["shared_layers"] = [list(p) for p in pairs]
            else:
                model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / LINEAGE_FILE).write_text(json.dumps(record, indent=2, default=str))
    return path


def weights_size_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model directory (what a user downloads or keeps in memory-mapped form)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
