"""Never lose a user's data: every verb that writes refuses to overwrite its inputs or a user's files, says in
one line when it cannot write, and writes atomically. Each case also checks that the input is untouched,
byte for byte. Tiny random models; the refusals happen before any model is loaded, so most cases are fast."""

from __future__ import annotations

import hashlib
from importlib import import_module as module  # minigiant.evaluate the attribute is the function, not the package
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minigiant import artifact
from minigiant.cli import main
from minigiant.errors import OutputError

from test_cli import assert_one_line_error, run_cli


def snapshot(path: Path) -> dict:
    """Every file and folder under ``path`` (hidden ones too) with the SHA-256 of each file's bytes."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded or evaluated: the checks must come before any slow work."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(module("minigiant.models.loading"), "load", loaded)
    monkeypatch.setattr(module("minigiant.pipeline"), "load", loaded)
    monkeypatch.setattr(module("minigiant.evaluate"), "_run_worker", loaded)


def _recipe(tmp_path: Path, model, output, stages=None, name="recipe.yaml") -> Path:
    stages = stages or [{"quantize": {"bits": 8, "group_size": 32}}]
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": str(model), "output": str(output), "stages": stages}))
    return path


def _writes(verb: str, model: Path, output: Path, tmp_path: Path, *extra) -> list:
    """The command line of ``verb`` reading ``model`` and writing ``output``."""
    if verb == "load":
        return ["load", model, output, *extra]
    if verb == "distill":
        return ["distill", model, output, "--teacher", model, *extra]
    if verb == "evaluate":
        return ["evaluate", model, "--output", output, *extra]
    if verb == "run":
        return ["run", _recipe(tmp_path, model, output, name="recipe-under-test.yaml"), *extra]
    return [verb, model, output, *extra]


WRITERS = ["load", "prune", "distill", "quantize", "evaluate", "run"]


# ---- 1. the output is, lies inside, or contains an input -----------------------------------------------------

@pytest.mark.parametrize("verb", WRITERS)
def test_output_that_is_or_overlaps_the_input_is_refused(capsys, tmp_path, tiny_model_dir, no_loading, verb):
    before = snapshot(tiny_model_dir)
    cases = [
        (tiny_model_dir, "is the input"),
        (tiny_model_dir / "sub", "lies inside the input"),
        (tmp_path, "lies inside the output"),  # tmp_path holds the model
    ]
    for output, pattern in cases:
        code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, output, tmp_path))
        assert_one_line_error(code, err, pattern)
        assert str(tiny_model_dir) in err and str(output) in err  # the line names both paths
        # --overwrite never lifts this rule
        code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, output, tmp_path, "--overwrite"))
        assert_one_line_error(code, err, pattern)
    assert snapshot(tiny_model_dir) == before
    assert not (tiny_model_dir / "sub").exists()


def test_teacher_text_gguf_and_recipe_count_as_inputs(capsys, tmp_path, tiny_model_dir, no_loading):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    before = snapshot(teacher)
    code, _, err = run_cli(capsys, "distill", tiny_model_dir, teacher, "--teacher", teacher)
    assert_one_line_error(code, err, f"the output {teacher} is the input {teacher}")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "book.txt").write_text("some training text " * 50)
    code, _, err = run_cli(capsys, "distill", tiny_model_dir, texts / "out", "--teacher", teacher, "--text", texts)
    assert_one_line_error(code, err, "lies inside the input")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", texts, "--text", texts / "book.txt")
    assert_one_line_error(code, err, "lies inside the output")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in: refused before it is read")
    code, _, err = run_cli(capsys, "load", gguf, gguf)
    assert_one_line_error(code, err, "is the input")
    # a recipe file inside the run folder would be overwritten by the run's recipe.yaml
    folder = tmp_path / "project"
    folder.mkdir()
    recipe = _recipe(folder, tiny_model_dir, folder)
    code, _, err = run_cli(capsys, "run", recipe, "--overwrite")
    assert_one_line_error(code, err, f"the input {recipe} lies inside the output {folder}")
    assert snapshot(teacher) == before and (texts / "book.txt").read_text().startswith("some")
    assert [p.name for p in folder.iterdir()] == ["recipe.yaml"]


# ---- 2. an existing output that is not an earlier output of the same kind ------------------------------------

@pytest.mark.parametrize("verb", WRITERS)
def test_folder_of_user_files_is_refused_without_overwrite(capsys, tmp_path, tiny_model_dir, no_loading, verb):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("two years of work")
    (mine / "data").mkdir()
    (mine / "data" / "results.csv").write_text("1,2,3\n")
    plain = tmp_path / "notes.txt"
    plain.write_text("a plain file")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, mine, tmp_path))
    assert_one_line_error(code, err, f"{mine} already exists and is a folder of other files.*--overwrite")
    code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, plain, tmp_path))
    assert_one_line_error(code, err, f"{plain} already exists and is a file.*--overwrite")
    before.pop("recipe-under-test.yaml", None)  # written by _writes for `run`
    after = snapshot(tmp_path)
    after.pop("recipe-under-test.yaml", None)
    assert after == before


def test_model_made_by_another_stage_is_refused(capsys, tmp_path, tiny_model_dir, no_loading):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    lineage = json.loads((other / "minigiant.json").read_text())
    lineage["stages"].append({"stage": "distill", "settings": {}, "metrics": {}})
    (other / "minigiant.json").write_text(json.dumps(lineage))
    before = snapshot(other)
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, other)
    assert_one_line_error(code, err, f"{other} already exists and is a model made by minigiant distill, not a quantize output; pass --overwrite")
    assert snapshot(other) == before


def test_overwrite_replaces_a_user_folder_and_earlier_output_is_replaced_with_a_note(capsys, tmp_path, tiny_model_dir):
    before = snapshot(tiny_model_dir)
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, out, "--bits", "8", "--group-size", "32", "--overwrite")
    assert code == 0, err
    assert err.strip() == f"note: {out} (a folder of other files) will be replaced, as --overwrite asks"
    assert not (out / "notes.txt").exists() and artifact.read_lineage(out)["stages"][-1]["settings"]["bits"] == 8
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, out, "--bits", "4", "--group-size", "32")
    assert code == 0, err
    assert err.strip() == f"note: {out} holds an earlier output (a model made by minigiant quantize); it will be replaced once the new one is complete"
    assert artifact.read_lineage(out)["stages"][-1]["settings"]["bits"] == 4
    assert [p.name for p in tmp_path.glob(".*")] == []  # no temp or old folders left beside it
    plain = tmp_path / "file-output"
    plain.write_text("replace me")
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, plain, "--bits", "8", "--overwrite")
    assert code == 0, err
    assert (plain / "minigiant.json").is_file()
    assert snapshot(tiny_model_dir) == before


def test_output_that_holds_the_current_folder_is_refused_even_with_overwrite(capsys, tmp_path, tiny_model_dir, no_loading, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for output in (".", ".."):
        code, _, err = run_cli(capsys, "quantize", tiny_model_dir, output, "--overwrite")
        assert_one_line_error(code, err, "current folder")


def notes(err: str) -> list[str]:
    """The note lines of a command's stderr (evaluate also prints its summary table there)."""
    return [line for line in err.splitlines() if line.startswith("note:")]


def _fake_worker(name, model_dir, config, options=None, on_step=None):
    return {"path": str(model_dir), "lineage_stages": ["load"], "params": 10, "non_embedding_params": 5, "disk_bytes": 1000,
            "ttft_s": None, "prefill_tokens_per_s": None, "decode_tokens_per_s": None, "answers": [], "peak_rss_mb": 1.0,
            "perplexity": 2.0, "ppl_tokens": 3}


def test_evaluate_writes_into_new_report_or_run_folders_only(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(module("minigiant.evaluate"), "_run_worker", _fake_worker)
    before = snapshot(tiny_model_dir)
    report = tmp_path / "report"
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", report)
    assert code == 0 and notes(err) == [], err
    assert {p.name for p in report.iterdir()} == {"report.md", "report.json", "report.html", "pareto.png", "pareto-speed.png", ".evaluate-cache"}
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", report)  # an earlier report: replaced
    assert code == 0 and notes(err) == [f"note: {report} holds an earlier report (a minigiant evaluation report folder); its report files (report.md, .json, .html and the plots) will be replaced"]
    run_dir = tmp_path / "run"  # a run folder holds a report of its own
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(artifact.RUN_HEADER + "model: x\n")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", run_dir)
    assert code == 0 and notes(err) == [f"note: {run_dir} holds an earlier report (a minigiant run folder); its report files (report.md, .json, .html and the plots) will be replaced"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", mine)
    assert_one_line_error(code, err, "is a folder of other files, not a minigiant evaluation report folder")
    assert (mine / "report.md").read_text() == "my own report"
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", mine, "--overwrite")
    assert code == 0 and notes(err) == [f"note: writing into {mine} (a folder of other files) as --overwrite asks; files of the same names are replaced"]
    assert json.loads((mine / "report.json").read_text())["models"][0]["perplexity"] == 2.0
    assert snapshot(tiny_model_dir) == before


def test_run_keeps_its_own_stage_folders_working(capsys, tmp_path, tiny_model_dir):
    """A run folder is ours: rerunning reuses it, a stage whose verb changed replaces its folder, and the
    run's own saved recipe can be run again; a folder of user files is refused unless --overwrite."""
    before = snapshot(tiny_model_dir)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, out, [{"quantize": {"bits": 8, "group_size": 32}, "name": "small"}])
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 0, err
    assert (out / "recipe.yaml").read_text().startswith(artifact.RUN_HEADER)
    code, _, err = run_cli(capsys, "run", out / "recipe.yaml")  # reproduce a run from its saved recipe
    assert code == 0 and "holds an earlier minigiant run" in err
    recipe = _recipe(tmp_path, tiny_model_dir, out, [{"prune": {"target": 0.5, "calibration_blocks": 1, "block_size": 16}, "name": "small"}])
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 0, err
    assert artifact.read_lineage(out / "01-small")["stages"][-1]["stage"] == "prune"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    recipe = _recipe(tmp_path, tiny_model_dir, mine)
    code, _, err = run_cli(capsys, "run", recipe)
    assert_one_line_error(code, err, "is a folder of other files, not a minigiant run folder; pass --overwrite")
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(capsys, "run", recipe, "--overwrite")
    assert code == 0, err
    assert (mine / "keep.txt").read_text() == "keep" and (mine / "01-quantize" / "minigiant.json").is_file()
    assert snapshot(tiny_model_dir) == before


def test_python_save_follows_the_same_rule(tmp_path, tiny_model, tokenizer):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="folder of other files"):
        artifact.save(tiny_model, tokenizer, mine)
    assert [p.name for p in mine.iterdir()] == ["a.txt"]
    artifact.save(tiny_model, tokenizer, tmp_path / "m")
    artifact.save(tiny_model, tokenizer, tmp_path / "m")  # its own earlier output
    artifact.record_stage(tiny_model, "prune", {})
    with pytest.raises(OutputError, match="a model saved by minigiant, not a prune output"):
        artifact.save(tiny_model, tokenizer, tmp_path / "m")
    artifact.save(tiny_model, tokenizer, mine, overwrite=True)
    assert not (mine / "a.txt").exists() and (mine / "minigiant.json").is_file()


# ---- 3. an output the user cannot write ----------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one can create entries in: chmod for a normal user; for root (which ignores permission
    bits) the immutable attribute. Skipped where neither stops a write."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    else:
        pytest.skip("running as root without chattr support here: no folder refuses writes")
    try:
        (folder / "probe").mkdir()
    except OSError:
        pass
    else:
        undo()
        pytest.skip("this file system lets us write into a read-only folder")
    yield folder
    undo()


@pytest.mark.parametrize("verb", WRITERS)
def test_unwritable_output_is_one_line_before_any_slow_work(capsys, tmp_path, tiny_model_dir, read_only_dir, no_loading, verb):
    before = snapshot(tiny_model_dir)
    for output in (read_only_dir / "out", read_only_dir / "new" / "deeper" / "out"):
        code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, output, tmp_path))
        assert_one_line_error(code, err, f"cannot write {output}: {read_only_dir} is not writable")
    under_a_file = tmp_path / "notes.txt"
    under_a_file.write_text("x")
    code, _, err = run_cli(capsys, *_writes(verb, tiny_model_dir, under_a_file / "out", tmp_path))
    assert_one_line_error(code, err, f"cannot create {under_a_file / 'out'}: {under_a_file} is a file, not a folder")
    assert snapshot(tiny_model_dir) == before
    assert list(read_only_dir.iterdir()) == []


def test_permission_error_during_the_write_is_one_line(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """A folder that turns unwritable after the early check (or a full disk) still gives one line and no
    output; simulated by making the save itself fail as the OS would."""
    from transformers import PreTrainedModel

    def denied(self, directory, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", denied)
    before = snapshot(tiny_model_dir)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", tiny_model_dir, out, "--target", "0.5", "--calibration-blocks", "1", "--block-size", "16")
    assert_one_line_error(code, err, f"could not write {out}: Permission denied")
    assert not out.exists() and [p.name for p in tmp_path.glob(".*")] == []

    def disk_full(self, directory, **kwargs):
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    code, _, err = run_cli(capsys, "load", tiny_model_dir, out)
    assert_one_line_error(code, err, f"could not write {out}: No space left on device")
    assert not out.exists() and snapshot(tiny_model_dir) == before

    monkeypatch.undo()
    from minigiant.evaluate import report

    monkeypatch.setattr(module("minigiant.evaluate"), "_run_worker", _fake_worker)

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system", str(tmp_path / "eval" / "report.json"))

    monkeypatch.setattr(report, "write_atomic", read_only)
    code, _, err = run_cli(capsys, "evaluate", tiny_model_dir, "--output", tmp_path / "eval")
    assert_one_line_error(code, err, "could not write .*eval.*Read-only file system")


# ---- 4. a stage that fails half-way leaves nothing that looks complete ---------------------------------------

def _complete_models(root: Path) -> list[Path]:
    """Folders under ``root`` at a final (non-hidden) path that look like a finished model."""
    return [p.parent for p in root.rglob("config.json") if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def test_stage_failing_half_way_leaves_no_complete_looking_folder(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """save_pretrained writes the config and the weights, then the tokenizer save fails: written straight
    into the final folder, this would leave a folder a user (or `minigiant info`) takes for a finished model."""
    before = snapshot(tiny_model_dir)
    previous = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, previous, "--bits", "8", "--group-size", "32")
    assert code == 0, err
    previous_files = snapshot(previous)

    from transformers import PreTrainedTokenizerBase

    def dies(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer_config.json").write_text("{")  # half a file
        raise RuntimeError("the machine died while writing the tokenizer")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", dies)
    fresh = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="machine died"):
        main([str(a) for a in ("prune", tiny_model_dir, fresh, "--target", "0.5", "--calibration-blocks", "1", "--block-size", "16")])
    assert not fresh.exists()
    with pytest.raises(RuntimeError, match="machine died"):  # replacing an earlier output: it survives intact
        main([str(a) for a in ("quantize", tiny_model_dir, previous, "--bits", "4", "--group-size", "32")])
    assert snapshot(previous) == previous_files
    assert sorted(_complete_models(tmp_path)) == sorted([tiny_model_dir, previous])
    assert [p.name for p in tmp_path.glob(".*")] == []
    assert snapshot(tiny_model_dir) == before


KILLED_SAVE = """
import os, signal, sys
from transformers import PreTrainedTokenizerBase
from minigiant.cli import main
def dies(self, directory, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # weights and config are written; nothing runs after this
PreTrainedTokenizerBase.save_pretrained = dies
main(sys.argv[1:])
"""


def test_killed_stage_leaves_only_a_hidden_temp_folder_that_the_next_write_removes(tmp_path, tiny_model_dir):
    """A stage killed mid-write (OOM killer, power loss) runs no cleanup at all: the final path must still
    not exist, and the next write to it removes the dead writer's leftovers."""
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, "quantize", str(tiny_model_dir), str(out), "--bits", "8"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.glob(".*")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".q.tmp-")  # hidden, named as unfinished
    assert _complete_models(tmp_path) == [tiny_model_dir]
    assert main(["quantize", str(tiny_model_dir), str(out), "--bits", "8"]) == 0
    assert (out / "minigiant.json").is_file() and [p.name for p in tmp_path.glob(".*")] == []


# ---- 5. generate: nonsense settings and unknown architectures ------------------------------------------------

@pytest.mark.parametrize("flags, pattern", [
    (["--temperature", "-1"], "--temperature must be 0 .greedy. or a positive number, got -1"),
    (["--temperature", "nan"], "--temperature must be .*got nan"),
    (["--temperature", "inf"], "--temperature must be .*got inf"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number of at least 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be .*got -5"),
])
def test_generate_refuses_nonsense_settings_before_loading(capsys, tiny_model_dir, no_loading, flags, pattern):
    code, _, err = run_cli(capsys, "generate", tiny_model_dir, "Hello", *flags)
    assert_one_line_error(code, err, pattern)


def test_generate_accepts_sampling(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "generate", tiny_model_dir, "Hello", "--temperature", "0.7", "--max-new-tokens", "3")
    assert code == 0, err


@pytest.mark.parametrize("config, pattern", [
    ({"model_type": "frobnicator"}, r"model_type 'frobnicator' in .*config.json is not known to transformers \d+\.\d+.*; minigiant works with .*llama, qwen2"),
    ({"architectures": ["FooForCausalLM"]}, r"names no model_type.*llama, qwen2"),
    ({"model_type": "vit"}, r"model_type 'vit' .* has no causal-LM .*llama, qwen2"),
])
def test_unknown_architecture_is_one_line_naming_it(capsys, tmp_path, tiny_model_dir, config, pattern):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text(json.dumps(config))
    for argv in (("generate", broken, "Hello"), ("quantize", broken, tmp_path / "out")):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "out").exists()


def test_gguf_of_an_unknown_architecture_is_one_line_listing_the_readable_ones(capsys, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = run_cli(capsys, "generate", path, "Hello")
    assert_one_line_error(code, err, r"frobnicator.*transformers reads GGUF files of these architectures: .*llama.*qwen2")
