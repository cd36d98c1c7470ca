"""The study (recipes compared by leave-one-collection-out) and the objective a shortcut cannot
win: constructed cases with known answers (paired differences, the selection rule, which groups
count), bad input before any training, and the study stage end to end at smoke size (two recipes,
one group: real training, real MLflow store)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import make_cfg, synthetic_xrays
from covidxray import CovidXrayError
from covidxray.evaluation import loco
from covidxray.evaluation import study as S
from covidxray.training import loco_groups

LOCO = [  # as test_loco's: K = 6 supports sensitivity 0.5 at confidence 0.8
    "loco.calibration.k=6",
    "loco.calibration.draws=5",
    "loco.calibration.target_sensitivity=0.5",
    "loco.calibration.confidence=0.8",
    "evaluate.bootstrap=50",
]


# -- paired differences and the selection rule ----------------------------------------------------


def delta(d, lo, hi, counted=True):
    return {"delta": d, "low": lo, "high": hi, "n_images": 500, "counted": counted}


@pytest.mark.parametrize(
    ("deltas", "d_mean", "qualifies", "why"),
    [
        ({"a": delta(0.05, 0.01, 0.09), "b": delta(0.08, 0.02, 0.12)}, 0.065, True, "worst group a: .* lies above 0"),
        ({"a": delta(0.05, -0.01, 0.09), "b": delta(0.08, 0.02, 0.12)}, 0.065, False, "worst group a: .* includes"),
        ({"a": delta(0.05, 0.01, 0.09), "s": delta(-0.3, -0.4, -0.2, False)}, -0.01, False, "the mean drops"),
        ({"s": delta(0.3, 0.2, 0.4, counted=False)}, None, False, "no counted group"),
    ],
)
def test_selection_rule(deltas, d_mean, qualifies, why):
    """Worst counted group's interval above 0 and the mean not dropping; groups where class is
    collection neither help nor hurt."""
    ok, text = S.selection({"d_mixed_mean": d_mean}, deltas)
    assert ok is qualifies
    assert pytest.importorskip("re").search(why, text), text


# -- the objective: only groups where class is not collection -------------------------------------


def shortcut_data(root):
    """A constructed store: ieee8023 (covid) bright, kermany (normal) dark: class = collection, a
    pure shortcut any recipe separates; radiography holds both classes drawn alike (nothing to
    learn, pixel statistics separate nothing)."""
    from covidxray.data.images import save_curated
    from covidxray.stages.split import make_splits

    rng = np.random.default_rng(3)
    arrays, rows = [], []
    plain = synthetic_xrays(80, 32, positive=False, rng=rng)
    parts = [
        ("ieee8023", "covid", np.clip(synthetic_xrays(40, 32, False, rng).astype(int) + 90, 0, 255).astype(np.uint8)),
        ("kermany", "normal", (synthetic_xrays(40, 32, False, rng) // 3).astype(np.uint8)),
        ("radiography", "covid", plain[:40]),
        ("radiography", "normal", plain[40:]),
    ]
    for source, label, imgs in parts:
        arrays.append(imgs)
        for i in range(len(imgs)):
            rows.append(
                {
                    "image_id": f"{source}-{label}-{i:03d}",
                    "label": label,
                    "y": int(label == "covid"),
                    "patient_id": f"{source}-{label}-p{i:03d}",
                    "source": source,
                    "dup_group": f"{source}-{label}-{i:03d}",
                    "orig_width": 32,
                    "orig_height": 32,
                    "orig_format": "PNG",
                    "orig_mode": "L",
                }
            )
    index = pd.DataFrame(rows)
    save_curated(root / "curated", np.concatenate(arrays), index, ["normal", "covid"])
    make_splits(index, test_fraction=0.25, folds=2, seed=0).to_csv(root / "splits.csv", index=False)
    return root / "curated", root / "splits.csv"


def test_the_smoke_recipe_cannot_win_the_objective_on_a_shortcut(tmp_path):
    """The smoke recipe (32 px CNN, 1 epoch) through LOCO on a store where one group is a pure
    shortcut (class = collection: the shortcut baseline separates it perfectly) and the other holds
    both classes drawn alike. On the shortcut group a recipe's AUC says which way its scores lean
    on brightness, not covid: a recipe winning it (AUC 1) beats one losing it (AUC 0.5) on the old
    loco_auc_mean, by that group alone. The objective (loco_auc_mixed_mean) leaves the group out:
    there the two are equal, the smoke recipe's objective is its AUC on the mixed group."""
    from covidxray.settings.loco import loco_settings

    curated, splits = shortcut_data(tmp_path)
    s = loco_settings(make_cfg(["experiment=smoke", "loco.objective.min_images=10", *LOCO]))
    assert s.spec.groups == (("radiography",), ("ieee8023", "kermany"))
    smoke = loco.run(curated, splits, s.recipe, s.spec, s.seed)
    shortcut, mixed = smoke["groups"]["ieee8023+kermany"], smoke["groups"]["radiography"]
    assert shortcut["shortcut_auc"] > 0.9 and not shortcut["counted"]
    assert shortcut["counted_why"].startswith("class is collection: shortcut baseline AUC 1.000 > 0.9")
    assert mixed["shortcut_auc"] <= 0.9 and mixed["counted"]
    assert smoke["summary"]["loco_auc_mixed_mean"] == pytest.approx(mixed["auc"])
    assert smoke["summary"]["loco_groups_counted"] == 1

    def with_shortcut_auc(auc: float) -> dict:
        groups = {name: dict(g) for name, g in smoke["groups"].items()}
        groups["ieee8023+kermany"]["auc"] = auc
        return loco.summarise(groups, s.spec)

    learnt, not_learnt = with_shortcut_auc(1.0), with_shortcut_auc(0.5)
    assert learnt["loco_auc_mean"] > not_learnt["loco_auc_mean"]  # the old objective rewards the shortcut
    assert learnt["loco_auc_mixed_mean"] == not_learnt["loco_auc_mixed_mean"] == smoke["summary"]["loco_auc_mixed_mean"]


def test_small_groups_are_flagged_not_counted():
    spec_small = dict(max_shortcut_auc=0.9, min_images=100)
    small = {"auc": 0.9, "shortcut_auc": 0.6, "n_images": 40}
    assert loco_groups.counted(small, **spec_small) == (False, "40 images < 100: flagged, interval only")
    assert loco_groups.counted({**small, "n_images": 2000}, **spec_small) == (True, "counted")
    assert loco_groups.counted({"n_images": 500}, **spec_small)[0] is False  # one class: no AUC


# -- bad input: one line naming the key, before any training, nothing written ---------------------


def study_cfg(tmp_path, recipes, *extra):
    """The study config with `recipes`, compared with `erm` unless `extra` names another baseline."""
    cfg = make_cfg([f"paths.reports={tmp_path / 'reports'}", "study.baseline=erm", *extra])
    cfg.study.recipes = recipes
    return cfg


@pytest.mark.parametrize(
    ("recipes", "extra", "message"),
    [
        ([], [], r"^study.recipes must be a non-empty list"),
        ([{"name": "erm", "overrides": []}], ["study.baseline=groupdro"], r"^study.baseline must be the name of a"),
        ([{"name": "erm"}, {"name": "erm", "overrides": ["optimizer.lr=0.1"]}], [], r"study.recipes\[1\].name must"),
        (
            [{"name": "erm"}, {"name": "x", "overrides": ["algorithm=nosuch"]}],
            [],
            r"^study.recipes\[1\] \(x\).overrides",
        ),
        ([{"name": "erm"}, {"name": "x", "overrides": ["data.normalize=sharpen"]}], [], r"data.normalize must be"),
        ([{"name": "erm"}], ["loco.groups=[[radiography],[radiography]]"], r"loco.groups\[1\]=.*named twice"),
    ],
)
def test_bad_study_input_fails_before_training(tmp_path, recipes, extra, message):
    from covidxray.stages import study

    with pytest.raises(CovidXrayError, match=message) as err:
        study.main(study_cfg(tmp_path, recipes, *extra))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "reports").exists()


def test_a_group_named_twice_is_refused():
    from covidxray.settings.loco import loco_settings

    with pytest.raises(CovidXrayError, match=r"loco.groups\[1\]=\['kermany', 'ieee8023'\]: the same group is named"):
        loco_settings(make_cfg(["loco.groups=[[ieee8023,kermany],[kermany,ieee8023]]"]))


# -- the stage, end to end at smoke size ------------------------------------------------------------


@pytest.fixture(scope="module")
def study_run(tiny_data, tmp_path_factory):
    from covidxray.stages import study

    root = tmp_path_factory.mktemp("study")
    cfg = make_cfg(
        [
            "experiment=smoke",
            f"paths.curated={tiny_data['curated']}",
            f"paths.splits={tiny_data['splits']}",
            f"paths.reports={root / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "loco.groups=[[radiography]]",
            "loco.objective.min_images=10",
            "loco.objective.max_shortcut_auc=1.0",  # tiny_data's synthetic classes differ in pixel statistics
            "study.baseline=erm",
            *LOCO,
        ]
    )
    cfg.study.recipes = OmegaConf.create(
        [{"name": "erm", "overrides": []}, {"name": "fast", "overrides": ["optimizer.lr=0.01"]}]
    )
    headline = study.main(cfg)
    out = root / "reports" / "study"
    return {"cfg": cfg, "out": out, "headline": headline, "study": json.loads((out / "study.json").read_text())}


def test_study_writes_the_table_the_forest_and_the_verdicts(study_run):
    out, found = study_run["out"], study_run["study"]
    assert sorted(p.name for p in out.iterdir()) == [
        "forest.csv",
        "forest.png",
        "headline.json",
        "report.md",
        "study.json",
        "table.csv",
    ]
    table = pd.read_csv(out / "table.csv")
    assert table["recipe"].tolist() == ["erm", "fast"]
    erm = found["recipes"]["erm"]["summary"]
    assert table.loc[0, "auc_mixed_mean"] == pytest.approx(erm["loco_auc_mixed_mean"], rel=1e-3)
    d = found["deltas"]["fast"]["radiography"]
    fast = found["recipes"]["fast"]["groups"]["radiography"]["auc"]
    assert d["delta"] == pytest.approx(fast - found["recipes"]["erm"]["groups"]["radiography"]["auc"], abs=2e-4)
    assert d["low"] <= d["delta"] <= d["high"] and d["counted"]
    forest = pd.read_csv(out / "forest.csv")
    assert forest[["recipe", "group"]].values.tolist() == [["fast", "radiography"]]
    verdict = found["verdicts"]["fast"]
    assert verdict["qualifies"] == (d["low"] > 0 and table.loc[1, "d_mixed_mean"] >= 0)
    report = (out / "report.md").read_text()
    assert (
        "**Selection**" in report and f"- fast: {'qualifies' if verdict['qualifies'] else 'does not qualify'}" in report
    )
    probe = found["recipes"]["erm"]["groups"]["radiography"]["inspected"]
    assert set(probe) == {"covid", "normal"} and all(0 <= c["auc"] <= 1 for c in probe.values())
    assert all(len(line) <= 120 for line in (out / "headline.json").read_text().splitlines())
    assert study_run["headline"] == json.loads((out / "headline.json").read_text())
    assert set(study_run["headline"]) <= {"auc", "auc_min", "qualify"}  # `dvc metrics show`: shared columns
    fast = table.loc[1]  # the best (only) recipe besides the baseline
    assert study_run["headline"]["auc"] == pytest.approx(fast["auc_mixed_mean"], rel=1e-3)


def test_each_recipe_is_a_nested_mlflow_run(study_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study_run["cfg"].mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(study_run["cfg"].mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_name == "study"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags["recipe"] for r in children) == ["erm", "fast"]
    fast = next(r for r in children if r.data.tags["recipe"] == "fast")
    assert fast.data.tags["overrides"] == "optimizer.lr=0.01" and "loco_auc_mixed_mean" in fast.data.metrics


def test_a_recipe_in_a_study_gives_its_figures_alone(tiny_data, tmp_path):
    """A study shares the loaded images, the feature cache and the built models between its recipes
    (loco.LocoData; recipes grouped by inputs): each recipe's LOCO figures and scores are those of
    the same recipe run alone (loco.run), to the digit. The smoke CNN frozen (the stacked heads; a
    frozen Lite0 took 3x as long); `crop` has other inputs, so the study reads the images twice and
    runs it after the others."""
    from covidxray.settings.study import study_settings
    from covidxray.stages import study

    frozen = [
        "experiment=smoke",
        "model.freeze_base=true",
        "model.features=last",  # the "blocks" recipe must differ
        "model.head.pool_size=1",
        "train.epochs=2",
        "study.baseline=erm",
    ]
    paths = [f"paths.curated={tiny_data['curated']}", f"paths.splits={tiny_data['splits']}"]
    cfg = make_cfg([*frozen, *paths, f"paths.features={tmp_path / 'features'}", "loco.groups=[[radiography]]", *LOCO])
    cfg.study.recipes = OmegaConf.create(
        [
            {"name": "erm", "overrides": []},
            {"name": "crop", "overrides": ["data.crop_border=0.1"]},
            {"name": "l2_0", "overrides": ["model.head.l2=0.0"]},
            {"name": "blocks", "overrides": ["model.features=blocks"]},
        ]
    )
    s = study_settings(cfg)
    together = study.run_recipes(s)
    assert list(together) == ["erm", "crop", "l2_0", "blocks"]
    for r in s.recipes:
        ls = r.loco
        alone = loco.run(ls.train.curated, ls.train.splits, ls.recipe, ls.spec, ls.seed)
        assert together[r.name]["summary"] == alone["summary"], r.name
        pd.testing.assert_frame_equal(together[r.name]["predictions"], alone["predictions"], check_exact=True)
        for name, g in alone["groups"].items():
            assert {k: v for k, v in together[r.name]["groups"][name].items() if k not in ("seconds", "inspected")} == {
                k: v for k, v in g.items() if k != "seconds"
            }, r.name


def test_the_model_card_leads_with_what_the_study_showed():
    """card.study_lines from a study.json: the recipes, each group's paired difference with its
    interval, and the count qualifying by the rule, also (plainly) when none does."""
    from covidxray.evaluation import card

    rows = [{"recipe": n} for n in ("erm", "vrex", "groupdro")]
    deltas = {
        "vrex": {"radiography": delta(-0.006, -0.008, -0.003), "ieee8023+kermany": delta(0.016, 0.009, 0.024, False)},
        "groupdro": {"radiography": delta(0.02, 0.01, 0.03)},
    }
    verdicts = {"vrex": {"qualifies": False, "why": "-"}, "groupdro": {"qualifies": True, "why": "-"}}
    study = {"baseline": "erm", "rule": S.SELECTION_RULE, "rows": rows, "deltas": deltas, "verdicts": verdicts}
    text = "\n".join(card.study_lines(study))
    assert "3 recipes through leave-one-collection-out" in text and "erm, vrex, groupdro" in text
    assert "**1 of 2 qualifies by the selection rule** (groupdro)." in text
    assert "| vrex | radiography | yes | -0.006 [-0.008, -0.003] |" in text
    assert "| vrex | ieee8023+kermany | no (class is collection) | 0.016 [0.009, 0.024] |" in text
    verdicts["groupdro"]["qualifies"] = False
    assert "**0 of 2 qualify by the selection rule**: none does, erm stays the default." in "\n".join(
        card.study_lines(study)
    )
