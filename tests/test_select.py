"""minigiant select: picks the best model that fits, drops the others with the reason, names the binding
constraint when nothing fits, and rejects contradicting constraints and non-model candidates."""

from __future__ import annotations

import json

import pytest

from minigiant.cli import main
from minigiant.errors import ConfigError, ModelLoadError
from minigiant.select import SelectConfig, load_candidates, run_select_stage, select

MIB = 1024 * 1024


def row(name, disk_mb, rss, tok_s, ttft, hellaswag, agreement):
    return {
        "name": name, "path": f"runs/x/{name}", "disk_bytes": int(disk_mb * MIB), "peak_rss_mb": rss, "decode_tokens_per_s": tok_s, "ttft_s": ttft,
        "perplexity": 20 / agreement, "top1_agreement": agreement,
        "tasks": {"hellaswag": {"metrics": {"acc": {"value": hellaswag - 0.02, "stderr": 0.01}, "acc_norm": {"value": hellaswag, "stderr": 0.01}}, "primary": "acc_norm"}},
    }


RESULTS = [
    row("teacher", 513, 900, 30.0, 0.20, 0.42, 1.00),
    row("distill", 310, 620, 48.0, 0.12, 0.33, 0.55),
    row("int8", 100, 420, 40.0, 0.14, 0.32, 0.54),
    row("int4", 60, 380, 35.0, 0.15, 0.29, 0.48),
]


def test_picks_the_best_model_that_fits_and_explains_why():
    answer = select(RESULTS, SelectConfig(max_ram_mb=500))
    assert answer["pick"] == "int8"  # teacher and distill use too much memory; int8 beats int4 on hellaswag
    assert [e["name"] for e in answer["ranked"]] == ["int8", "int4"]
    reasons = {d["name"]: d["reasons"] for d in answer["dropped"]}
    assert reasons["teacher"] == ["peak RSS (MiB) 900 fails peak RSS (MiB) ≤ 500"]
    assert "Pick int8" in answer["explanation"] and "Runner-up: int4" in answer["explanation"] and "distill (peak RSS" in answer["explanation"]

    fast = select(RESULTS, SelectConfig(min_decode_tokens_per_s=45))
    assert fast["pick"] == "distill"
    quality = select(RESULTS, SelectConfig(max_disk_mb=200, require=["hellaswag/acc_norm>=30%"]))
    assert quality["pick"] == "int8" and {d["name"] for d in quality["dropped"]} == {"teacher", "distill", "int4"}
    by_size = select(RESULTS, SelectConfig(require="hellaswag>=0.3", rank_by="disk_bytes"))
    assert by_size["pick"] == "int8"  # lower is better for a size; int4 fails the score bound


def test_nothing_fits_names_the_binding_constraint_and_the_gap():
    answer = select(RESULTS, SelectConfig(max_disk_mb=120, require=["hellaswag/acc_norm>=0.35"]))
    assert answer["pick"] is None
    binding = answer["binding"]
    assert binding["constraint"] == "hellaswag/acc_norm ≥ 0.35" and binding["model"] == "int8"
    assert binding["gap"] == pytest.approx(0.03) and binding["relaxed_bound"] == pytest.approx(0.32)
    assert "binding constraint is hellaswag/acc_norm ≥ 0.35" in answer["explanation"]

    ram = select(RESULTS, SelectConfig(max_ram_mb=300))
    assert ram["binding"]["constraint"] == "peak RSS (MiB) ≤ 300" and ram["binding"]["model"] == "int4" and ram["binding"]["gap"] == 80

    both = select(RESULTS, SelectConfig(max_ram_mb=300, max_ttft_s=0.1))
    assert both["binding"] is None and "no single constraint binds" in both["explanation"]


def test_contradicting_or_meaningless_constraints_are_errors():
    with pytest.raises(ConfigError, match="hellaswag must be >= 0.5 and <= 0.4"):
        select(RESULTS, SelectConfig(require=["hellaswag>=0.5", "hellaswag<=0.4"]))
    with pytest.raises(ConfigError, match="max_ram_mb: must be > 0"):
        select(RESULTS, SelectConfig(max_ram_mb=0))
    with pytest.raises(ConfigError, match="is not METRIC>=VALUE"):
        select(RESULTS, SelectConfig(require=["hellaswag > 0.3"]))


def test_an_unmeasured_metric_drops_the_model_with_that_reason():
    answer = select(RESULTS, SelectConfig(require=["gsm8k>=0.01"]))
    assert answer["pick"] is None and answer["dropped"][0]["reasons"] == ["gsm8k was not measured"]


def test_candidates_from_a_report_a_run_dir_and_bad_paths(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps({"title": "t", "reference": "teacher", "models": RESULTS}))
    assert [r["name"] for r in load_candidates([tmp_path / "run"])] == [r["name"] for r in RESULTS]
    assert len(load_candidates([tmp_path / "run" / "report.json"])) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        load_candidates([tmp_path / "empty"])
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_candidates([tmp_path / "absent"])


def test_cli_select_json_and_one_line_errors(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"models": RESULTS}))
    assert main(["select", str(report), "--max-ram-mb", "500", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pick"] == "int8"
    assert main(["select", str(report), "--min-decode-tokens-per-s", "100"]) == 0
    assert "binding constraint is decode tok/s ≥ 100" in capsys.readouterr().out
    assert main(["select", str(report), "--require", "[hellaswag>=0.5, hellaswag<=0.4]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_select_stage_writes_its_answer_beside_the_report(tmp_path):
    answer = run_select_stage(RESULTS, SelectConfig(max_disk_mb=200), tmp_path)
    assert answer["pick"] == "int8"
    assert json.loads((tmp_path / "selection.json").read_text())["pick"] == "int8"
    assert "Pick int8" in (tmp_path / "selection.md").read_text()
    with pytest.raises(ConfigError, match="needs an evaluate stage"):
        run_select_stage([], SelectConfig(), tmp_path)
