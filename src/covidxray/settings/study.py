"""The study stage's settings: the recipes (a name and Hydra overrides each), the baseline recipe,
and each recipe's leave-one-collection-out settings, all checked before anything is trained."""

from __future__ import annotations

import re
from dataclasses import dataclass

from covidxray import CovidXrayError
from covidxray.infra.config import fail, text, value, with_overrides
from covidxray.settings.evaluate import Reporting, reporting
from covidxray.settings.loco import LocoSettings, loco_settings

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a recipe's name is a file stem, a metric-name part and an MLflow run name


@dataclass(frozen=True)
class StudyRecipe:
    """One recipe of the study: its name, its overrides of the pipeline's configuration, and the
    LOCO settings they compose to."""

    name: str
    overrides: tuple[str, ...]
    loco: LocoSettings


@dataclass(frozen=True)
class StudySettings:
    recipes: tuple[StudyRecipe, ...]
    baseline: str  # the recipe every other is compared with (paired, per group)
    seed: int
    out: Reporting


def _recipe_entries(cfg) -> list[tuple[str, tuple[str, ...]]]:
    """[(name, overrides)] of `study.recipes`, checked: a non-empty list of {name, overrides}."""
    from omegaconf import OmegaConf

    found = value(cfg, "study.recipes")
    found = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
    allowed = "a non-empty list of {name: NAME, overrides: [KEY=VALUE, ...]}"
    if not isinstance(found, list) or not found:
        fail("study.recipes", allowed, found)
    out = []
    for i, entry in enumerate(found):
        key = f"study.recipes[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "overrides"}:
            fail(key, "a mapping {name: NAME, overrides: [KEY=VALUE, ...]}", entry)
        name, overrides = entry.get("name"), entry.get("overrides") or []
        if not isinstance(name, str) or not NAME.match(name):
            fail(f"{key}.name", "a name of letters, digits, '_', '.' or '-'", name)
        if name in [n for n, _ in out]:
            fail(f"{key}.name", "a name no other recipe has", name)
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            fail(f"{key}.overrides", "a list of Hydra overrides KEY=VALUE", overrides)
        out.append((name, tuple(overrides)))
    return out


def study_settings(cfg) -> StudySettings:
    """Every recipe composed and its LOCO settings checked, the baseline named, and all recipes
    held out on the same groups: before anything is read or trained."""
    entries = _recipe_entries(cfg)
    baseline = text(cfg, "study.baseline")
    names = [n for n, _ in entries]
    if baseline not in names:
        fail("study.baseline", f"the name of a recipe of study.recipes ({', '.join(names)})", baseline)
    recipes = []
    for i, (name, overrides) in enumerate(entries):
        key = f"study.recipes[{i}] ({name})"
        try:
            found = loco_settings(with_overrides(cfg, list(overrides), f"{key}.overrides"))
        except CovidXrayError as err:
            raise CovidXrayError(f"{key}: {err}" if not str(err).startswith(key) else str(err)) from None
        recipes.append(StudyRecipe(name, overrides, found))
    groups = {r.name: r.loco.spec.groups for r in recipes}
    for r in recipes:
        if groups[r.name] != groups[baseline]:
            raise CovidXrayError(
                f"study.recipes ({r.name}): held-out groups {list(groups[r.name])} differ from the baseline "
                f"{baseline}'s {list(groups[baseline])} (a study compares recipes on the same groups: set loco.groups)"
            )
    first = recipes[0].loco
    return StudySettings(tuple(recipes), baseline, first.seed, reporting(cfg))
