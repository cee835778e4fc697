import pytest
import yaml

from minigiant.errors import BudgetError, ConfigError
from minigiant.recipe import apply_override, default_recipe_path, load_recipe, planned_minutes, recipe_from_dict, time_scale


def write(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": "default", "stages": [{"prune": {"target": 0.5}}, {"distill": {"temperature": 2.0}}, {"quantize": {"bits": 4}, "name": "int4"}]}


def test_default_recipe_parses_into_configs():
    recipe = load_recipe(default_recipe_path())
    assert [s.verb for s in recipe.stages] == ["prune", "distill", "quantize", "quantize", "evaluate"]
    assert recipe.stages[0].config.target == 0.6
    assert recipe.stages[3].input == "distill" and recipe.stages[3].config.bits == 4 and recipe.stages[3].config.method == "awq"
    assert recipe.minutes == 20


def test_run_minutes_give_the_time_budgets_what_the_run_adds_or_takes(tmp_path):
    recipe = load_recipe(default_recipe_path())  # 20 minutes planned, 8.8 of them distillation
    assert time_scale(recipe, 20) == pytest.approx(1.0) and planned_minutes(recipe, time_scale(recipe, 60)) == pytest.approx(60)
    assert time_scale(recipe, 60) * 8.8 == pytest.approx(48.8)  # the other 11.2 minutes stay as planned
    assert time_scale(recipe, 15) * 8.8 == pytest.approx(3.8)
    with pytest.raises(BudgetError, match=r"--minutes 10 leaves no time for training: this recipe plans 11.2 of its 20 minutes"):
        time_scale(recipe, 10)
    two = recipe_from_dict({**BASE, "minutes": 10, "stages": [{"distill": {"minutes": 2}}, {"distill": {"minutes": 6}, "name": "again"}]})
    assert time_scale(two, 18) == pytest.approx(2.0)  # 2 fixed minutes; budgets of 8 become 16, each doubled
    with pytest.raises(ConfigError, match="no stage of this recipe has a time budget"):
        time_scale(recipe_from_dict({**BASE, "minutes": 10}), 20)
    with pytest.raises(ConfigError, match="top-level `minutes:`"):
        time_scale(recipe_from_dict(BASE), 20)


def test_a_time_budget_gets_what_keeps_the_run_to_its_plan():
    from minigiant.pipeline import budget_cap

    # 20 minutes planned, 8 gone, 7.8 of them in stages without a budget (load, prune): quantize and evaluate
    # after distillation are given as long again, 20 - 8 - 7.8 = 4.2.
    assert budget_cap(20, 8.0, 7.8, 0.0, True) == pytest.approx(4.2)
    assert budget_cap(20, 8.0, 7.8, 0.0, False) == pytest.approx(12.0)  # nothing after it: all that is left
    assert budget_cap(20, 8.0, 7.8, 3.0, True) == pytest.approx(1.2)  # a later stage's budget is kept for it
    assert budget_cap(10, 8.0, 7.8, 0.0, True) == pytest.approx(-5.8)  # past the plan: the stage decides


def test_shipped_recipes_load_by_name_and_an_unknown_name_lists_them(tmp_path, monkeypatch):
    sparse = load_recipe("sparse")
    prune, distill = sparse.stages[0].config, sparse.stages[1].config
    assert (prune.structure, prune.sparsity_method, prune.sparsity) == ("unstructured", "wanda", 0.4)
    assert distill.keep_sparsity is True and sparse.output == "runs/sparse"
    assert load_recipe("default").to_dict() == load_recipe(default_recipe_path()).to_dict()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sparse").write_text(yaml.safe_dump(BASE))  # a file of that name in the working folder wins
    assert load_recipe("sparse").stages[0].config.target == 0.5
    with pytest.raises(ConfigError, match=r"name of a shipped one \(default, sparse\)"):
        load_recipe("sprase")


def test_round_trip_through_dict():
    recipe = recipe_from_dict(BASE)
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["stages"][1]["distill"].update(temprature=3), r"unknown setting stages\[1\]\.distill\.temprature; did you mean 'temperature'"),
        (lambda d: d["stages"][1]["distill"].update(temperature="hot"), r"stages\[1\]\.distill\.temperature: expected a number, got 'hot'"),
        (lambda d: d["stages"][0]["prune"].update(target=True), r"stages\[0\]\.prune\.target: expected a number"),
        (lambda d: d["stages"][0]["prune"].update(target=1.5), r"stages\[0\]\.prune\.target: must be in \(0, 1\]"),
        (lambda d: d["stages"].append({"distil": {}}), r"unknown stage key stages\[3\]\.distil; did you mean 'distill'"),
        (lambda d: d.update(stagez=[]), r"unknown recipe key stagez; did you mean 'stages'"),
        (lambda d: d["stages"][2].update(input="nothing"), r"stages\[2\]\.input: 'nothing' is not an earlier stage"),
        (lambda d: d["stages"].append({"prune": {}, "distill": {}}), r"stages\[3\]: a stage names exactly one verb"),
        (lambda d: d.update(stages=[]), r"the recipe has no stages"),
        (lambda d: d["stages"][2]["quantize"].update(bits=7), r"stages\[2\]\.quantize\.bits"),
    ],
)
def test_bad_recipes_name_the_offending_key(tmp_path, change, message):
    import copy

    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, data))


def test_overrides_reach_stage_settings_and_are_validated(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["stages.2.bits=8", "stages[1].distill.lr=1e-3", "output=elsewhere"])
    assert recipe.stages[2].config.bits == 8
    assert recipe.stages[1].config.lr == pytest.approx(1e-3)
    assert recipe.output == "elsewhere"
    with pytest.raises(ConfigError, match=r"stages\[1\]\.distill\.temperature: expected a number"):
        load_recipe(path, ["stages.1.temperature=warm"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "nonsense")


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [prune: {target: 0.5}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
