"""Recipes: a YAML list of stages ⇄ dataclasses, validated with the path of any bad key.

```yaml
model: default          # teacher: 'default', a Hugging Face directory, or a .gguf file
output: runs/default    # run directory: one model directory per stage plus the report
minutes: 20             # the time the recipe is planned for; `run --minutes M` gives the time budgets what M adds or takes
stages:
  - prune: {target: 0.6}
  - distill: {minutes: 12}
  - quantize: {bits: 4}
    name: int4          # optional: directory / reference name (default: the verb)
    input: distill      # optional: which earlier stage (or 'teacher') it starts from (default: the previous one)
  - evaluate: {}        # evaluates the teacher and every model made before it
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import coerce, from_dict, parse_scalar
from .errors import BudgetError, ConfigError, did_you_mean
from .stages import STAGES, stage

STAGE_KEYS = ("name", "input", "models")  # stage-level keys beside the verb


@dataclass
class StageSpec:
    verb: str
    config: Any
    name: str
    input: Optional[str] = None  # None: the previous model-making stage (or the teacher)
    models: Optional[list] = None  # evaluate only: which models; None: all so far

    @property
    def budget(self) -> float:
        """The stage's time budget in minutes (``minutes:`` of a distill stage); 0 for a stage without one."""
        return getattr(self.config, "minutes", None) or 0


@dataclass
class Recipe:
    model: str = "default"
    output: str = "runs/default"
    seed: int = 0
    minutes: Optional[float] = None
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("model", "output", "seed", "minutes")}
        out["stages"] = []
        for spec in self.stages:
            entry = {spec.verb: dataclasses.asdict(spec.config), "name": spec.name}
            if spec.input is not None:
                entry["input"] = spec.input
            if spec.models is not None:
                entry["models"] = spec.models
            out["stages"].append(entry)
        return out


def _parse_stage(entry: Any, path: str, known: list[str]) -> StageSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: expected a mapping like {{distill: {{...}}}}, got {entry!r}")
    verbs = [k for k in entry if k not in STAGE_KEYS]
    for key in verbs:
        if key not in STAGES:
            hint = did_you_mean(key, STAGES.names() + list(STAGE_KEYS))
            raise ConfigError(f"unknown stage key {path}.{key}; {hint}stages are: {', '.join(STAGES.names())}")
    if len(verbs) != 1:
        raise ConfigError(f"{path}: a stage names exactly one verb ({', '.join(STAGES.names())}), found {verbs or 'none'}")
    verb = verbs[0]
    config = from_dict(stage(verb).config, entry[verb], f"{path}.{verb}")
    name = entry.get("name") or verb
    name = coerce(name, str, f"{path}.name")
    if name in known or name == "teacher":
        raise ConfigError(f"{path}.name: {name!r} is used twice; give this stage a distinct `name:`")
    source = coerce(entry["input"], str, f"{path}.input") if entry.get("input") is not None else None
    if source is not None and source not in known and source != "teacher":
        raise ConfigError(f"{path}.input: {source!r} is not an earlier stage; choose teacher or one of: {', '.join(known) or '(none yet)'}")
    models = coerce(entry["models"], list[str], f"{path}.models") if entry.get("models") is not None else None
    for m in models or []:
        if m not in known and m != "teacher":
            raise ConfigError(f"{path}.models: {m!r} is not an earlier stage; choose from teacher, {', '.join(known)}")
    return StageSpec(verb, config, name, source, models)


def recipe_from_dict(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe is a mapping with model, output and stages; got {type(data).__name__}")
    top = {f.name for f in dataclasses.fields(Recipe)}
    for key in data:
        if key not in top:
            raise ConfigError(f"unknown recipe key {key}; {did_you_mean(key, top)}valid keys: {', '.join(sorted(top))}")
    stages = coerce(data.get("stages") or [], list, "stages")
    recipe = from_dict(Recipe, {k: v for k, v in data.items() if k != "stages"}, "recipe")
    if recipe.minutes is not None and recipe.minutes <= 0:
        raise ConfigError(f"minutes: must be > 0, got {recipe.minutes}")
    known: list[str] = []
    for i, entry in enumerate(stages):
        spec = _parse_stage(entry, f"stages[{i}]", known)
        recipe.stages.append(spec)
        known.append(spec.name)
    if not recipe.stages:
        raise ConfigError("the recipe has no stages; add e.g. `stages: [{prune: {target: 0.6}}]`")
    return recipe


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {key}: {part!r} is not an index of a list with {len(node)} entries")
        return node[int(part)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is below a value that is not a mapping")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def apply_override(data: dict, assignment: str) -> None:
    """``--set stages.1.bits=3`` (short for ``stages.1.quantize.bits=3``) or ``--set output=runs/x``, applied
    to the raw recipe mapping before validation, so a typo is reported like one in the YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.1.bits=3")
    parts = key.replace("[", ".").replace("]", "").split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, key)
        is_stage = i >= 1 and parts[i - 1] == "stages" and isinstance(node, dict)
        if is_stage and i == len(parts) - 2 and parts[-1] not in node and parts[-1] not in STAGE_KEYS:
            verbs = [k for k in node if k not in STAGE_KEYS]
            if len(verbs) == 1:
                node = _child(node, verbs[0], key)
    node[parts[-1]] = parse_scalar(raw)


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped inside the package, by name (``default``, ``sparse``)."""
    return {p.stem: p for p in sorted(default_recipe_path().parent.glob("*.yaml"))}


def _split_minutes(recipe: Recipe) -> tuple[float, float]:
    """``(fixed, budgets)``: the minutes the recipe plans for stages without a time budget, and the sum of the
    stages' own budgets (``minutes:`` of a distill stage)."""
    budgets = sum(spec.budget for spec in recipe.stages)
    return max((recipe.minutes or 0) - budgets, 0.0), budgets


def planned_minutes(recipe: Recipe, scale: float) -> float | None:
    """The run's planned minutes when its time budgets are multiplied by ``scale`` (see ``time_scale``)."""
    if not recipe.minutes:
        return None
    fixed, budgets = _split_minutes(recipe)
    return fixed + budgets * scale


def time_scale(recipe: Recipe, minutes: float) -> float:
    """The factor ``run --minutes`` multiplies every stage's time budget (``minutes:``) by so that the whole run
    is planned for ``minutes``. The stages without a budget (load, prune, quantize, evaluate) keep the time the
    recipe plans for them, its ``minutes`` less the budgets; the budgets get the rest. On the default recipe
    (20 minutes, 8.8 of them distillation) ``--minutes 60`` distills for 48.8 minutes, not 26.4: a longer run
    is wanted for training, and the other stages take no longer for it."""
    if not (minutes > 0):
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    if not recipe.minutes:
        raise ConfigError("--minutes needs a recipe with a top-level `minutes:` (the time its budgets were planned for)")
    fixed, budgets = _split_minutes(recipe)
    if not budgets:
        raise ConfigError("--minutes: no stage of this recipe has a time budget (`minutes:`) to scale")
    if minutes <= fixed:
        raise BudgetError(f"--minutes {minutes:g} leaves no time for training: this recipe plans {fixed:g} of its {recipe.minutes:g} minutes "
                          f"for the stages without a time budget; pass more than {fixed:g}, or lower their work (e.g. prune.refit_steps)")
    return (minutes - fixed) / budgets


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML file, or a shipped recipe by its name (``minigiant run sparse``)."""
    shipped = shipped_recipes()
    path = Path(path) if Path(path).is_file() or str(path) not in shipped else shipped[str(path)]
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; pass a YAML recipe or the name of a shipped one ({', '.join(shipped)})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return recipe_from_dict(data)


def default_recipe_path() -> Path:
    """``recipes/default.yaml``, shipped inside the package as ``minigiant/recipes/default.yaml``."""
    return Path(__file__).parent / "recipes" / "default.yaml"
