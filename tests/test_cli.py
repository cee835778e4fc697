"""The CLI end to end on tiny models: each bad input gives one line on stderr, exit 1, and no output dir."""

import json

import numpy as np
import pytest
import yaml

from minigiant import artifact
from minigiant.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_help_explains_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb in ("run", "load", "prune", "distill", "quantize", "evaluate", "generate", "info"):
        assert verb in out
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--temperature" in out and "softmax temperature" in out and "--teacher" in out


def test_prune_quantize_info_and_generate_chain(capsys, tmp_path, tiny_model_dir):
    pruned = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", tiny_model_dir, pruned, "--target", "0.5", "--calibration-blocks", "2", "--block-size", "32")
    assert code == 0, err
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 2
    quantized = tmp_path / "q4"
    code, out, err = run_cli(capsys, "quantize", pruned, quantized, "--bits", "4", "--group-size", "32")
    assert code == 0, err
    code, out, err = run_cli(capsys, "info", quantized)
    stages = [s["stage"] for s in json.loads(out)["stages"]]
    assert stages[-2:] == ["prune", "quantize"]
    code, out, err = run_cli(capsys, "generate", quantized, "Hello", "--max-new-tokens", "5")
    assert code == 0, err


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prune", tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_file_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "quantize", tmp_path / "notes.txt", tmp_path / "out")
    assert_one_line_error(code, err, "is not a model")
    (tmp_path / "empty_dir").mkdir()
    code, _, err = run_cli(capsys, "quantize", tmp_path / "empty_dir", tmp_path / "out")
    assert_one_line_error(code, err, "no config.json")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(capsys, tmp_path, tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "quantize", tiny_model_dir, tmp_path / "out")
    assert_one_line_error(code, err, "corrupt or truncated safetensors")
    assert not (tmp_path / "out").exists()


def _write_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_and_fake_gguf(capsys, tmp_path):
    good = tmp_path / "tiny.gguf"
    _write_gguf(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "quantize", truncated, tmp_path / "out")
    assert_one_line_error(code, err, "corrupt or truncated GGUF")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    code, _, err = run_cli(capsys, "quantize", fake, tmp_path / "out")
    assert_one_line_error(code, err, "not a GGUF file")
    assert not (tmp_path / "out").exists()


def write_recipe(tmp_path, model_dir, minutes: float | None, stages: list):
    """A recipe file for ``model_dir`` writing into ``tmp_path / "run"``, its first stage a small width prune."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dir), "output": str(tmp_path / "run"), **({"minutes": minutes} if minutes else {}),
                                    "stages": [{"prune": {"target": 0.5, "calibration_blocks": 2, "block_size": 32}}, *stages]}))
    return path


def _recipe(tmp_path, model_dir, **distill):
    return write_recipe(tmp_path, model_dir, None, [{"distill": {"max_steps": 2, "block_size": 32, **distill}}])


def test_unknown_recipe_key_and_wrong_type(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "run", _recipe(tmp_path, tiny_model_dir, temprature=2.0))
    assert_one_line_error(code, err, r"unknown setting stages\[1\]\.distill\.temprature; did you mean 'temperature'")
    code, _, err = run_cli(capsys, "run", _recipe(tmp_path, tiny_model_dir, temperature="hot"))
    assert_one_line_error(code, err, r"stages\[1\]\.distill\.temperature: expected a number, got 'hot'")
    code, _, err = run_cli(capsys, "run", _recipe(tmp_path, tiny_model_dir), "--set", "stages.1.batch_size=many")
    assert_one_line_error(code, err, r"stages\[1\]\.distill\.batch_size: expected an integer")
    assert not (tmp_path / "run").exists()


def test_empty_and_short_training_text(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, "distill", tiny_model_dir, tmp_path / "out", "--teacher", tiny_model_dir, "--text", empty)
    assert_one_line_error(code, err, "no text found")
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.")
    code, _, err = run_cli(capsys, "distill", tiny_model_dir, tmp_path / "out", "--teacher", tiny_model_dir, "--text", short, "--block-size", "64")
    assert_one_line_error(code, err, "too short")
    assert not (tmp_path / "out").exists()


def test_prune_target_that_removes_every_layer(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "prune", tiny_model_dir, tmp_path / "out", "--target", "0.05")
    assert_one_line_error(code, err, "less than one decoder layer")
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_with_one_line(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "distill", tiny_model_dir, tmp_path / "out", "--teacher", tiny_model_dir, "--lr", "1e30", "--max-steps", "20", "--block-size", "32", "--warmup-steps", "1")
    assert_one_line_error(code, err, r"loss became (nan|inf) at step \d+; stopped")
    assert not (tmp_path / "out").exists()


def test_a_run_behind_its_plan_gives_distillation_what_is_left(capsys, tmp_path, tiny_model_dir):
    # Planned 0.1 minutes, all of them distillation: loading and pruning take some time, and the quantize stage
    # after is given as long again, so distillation gets under its 0.1 (never under 0.025).
    path = write_recipe(tmp_path, tiny_model_dir, 0.1, [{"distill": {"block_size": 32, "minutes": 0.1}}, {"quantize": {"bits": 8}}])
    code, out, err = run_cli(capsys, "run", path)
    assert code == 0, err
    stage = artifact.read_lineage(tmp_path / "run" / "02-distill")["stages"][2]
    assert stage["settings"]["minutes"] == 0.1 and 0.025 <= stage["metrics"]["budget_minutes"] < 0.1
    assert stage["metrics"]["stopped_by"] == "time"


def test_run_recipe_end_to_end_and_reuse(capsys, tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir, 2, [
        {"distill": {"max_steps": 3, "block_size": 32, "minutes": 1}},
        {"quantize": {"bits": 4, "group_size": 32}, "name": "int4"},
        {"evaluate": {"window": 64, "max_windows": 2, "max_new_tokens": 4, "speed_tokens": 4}},
    ])
    code, out, err = run_cli(capsys, "run", path, "--minutes", "3")
    assert code == 0, err
    run_dir = tmp_path / "run"
    for name in ("00-teacher", "01-prune", "02-distill", "03-int4"):
        assert (run_dir / name / "minigiant.json").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["name"] for r in report["models"]] == ["teacher", "prune", "distill", "int4"]
    assert (run_dir / "report.md").is_file() and (run_dir / "pareto.png").is_file()
    assert [p.name for p in run_dir.glob(".*")] == [".evaluate-cache"]  # no temp or work dirs left behind
    timings = json.loads((run_dir / "timings.json").read_text())
    assert timings["planned_minutes"] == 3
    assert [(r["stage"], r["verb"], r["reused"]) for r in timings["stages"]] == [
        ("teacher", "load", False), ("prune", "prune", False), ("distill", "distill", False), ("int4", "quantize", False), ("evaluate", "evaluate", False)]
    assert all(r["minutes"] >= 0 for r in timings["stages"]) and timings["total_minutes"] >= sum(r["minutes"] for r in timings["stages"]) - 0.05
    lineage = artifact.read_lineage(run_dir / "02-distill")
    assert [s["stage"] for s in lineage["stages"]] == ["load", "prune", "distill"]
    assert lineage["stages"][2]["settings"]["minutes"] == 1
    assert lineage["stages"][2]["metrics"]["budget_minutes"] == 2  # scaled by --minutes; on plan, so not capped
    mtime = (run_dir / "02-distill" / "model.safetensors").stat().st_mtime
    code, out, err = run_cli(capsys, "run", path, "--minutes", "3")  # same settings: reused, not redone
    assert code == 0 and (run_dir / "02-distill" / "model.safetensors").stat().st_mtime == mtime
    assert [r["reused"] for r in json.loads((run_dir / "timings.json").read_text())["stages"]] == [True, True, True, True, True]
    assert json.loads((run_dir / "report.json").read_text())["models"] == report["models"]  # measurements reused too
