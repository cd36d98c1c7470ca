"""Leave-one-collection-out and the shortcut probes: constructed cases with known answers (probes,
the shortcut baseline, site calibration draws, held-out groups), and the loco stage end to end on
the smoke recipe (real training per group, real MLflow store) with its model card."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_cfg
from covidxray import CovidXrayError
from covidxray.evaluation import calibration, card, loco, probes
from covidxray.training import loco_groups
from test_evaluate import overrides, trained_model

META = {"classes": ["normal", "covid"], "threshold": 0.5, "image_size": 16}


def brightness_model(size: int = 16, slope: float = 0.2, center: float = 100.0):
    """A real Keras model with set weights: p(covid) = sigmoid(2 * slope * (mean intensity - center)),
    its `head_dense` feature being the mean intensity."""
    import keras

    inputs = keras.Input((size, size, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(1, name="head_dense")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("head_dense").set_weights([np.ones((1, 1)), np.zeros(1)])
    model.get_layer("predictions").set_weights(
        [np.array([[-slope, slope]]), np.array([slope * center, -slope * center])]
    )
    return model


def flat_images(levels) -> np.ndarray:
    return np.stack([np.full((16, 16), v, np.uint8) for v in levels])


def test_same_source_probe_counts_what_the_model_calls_covid():
    model = brightness_model()
    frame = pd.DataFrame({"finding": ["ARDS", "ARDS", "Streptococcus", "No Finding"]})
    result = probes.same_source_probe(model, META, flat_images([200, 50, 180, 20]), frame)
    assert result["images"] == 4 and result["labelled_covid"] == 2 and result["share_labelled_covid"] == 0.5
    assert result["per_finding"]["ARDS"] == {"images": 2, "share_labelled_covid": 0.5}
    assert result["per_finding"]["Streptococcus"]["share_labelled_covid"] == 1.0
    assert (
        probes.same_source_probe(model, META, np.zeros((0, 16, 16), np.uint8), frame.iloc[:0])["share_labelled_covid"]
        is None
    )


def test_feature_collection_auc_separable_and_not():
    model = brightness_model()
    rng = np.random.default_rng(0)
    n = 40
    bright, dark = rng.integers(150, 200, n), rng.integers(30, 80, n)
    mixed_a, mixed_b = rng.integers(30, 200, n), rng.integers(30, 200, n)
    frame = pd.DataFrame(
        {
            "label": ["normal"] * (2 * n) + ["covid"] * (2 * n),
            "source": (["kermany"] * n + ["radiography"] * n) * 2,
            "patient_id": [f"p{i}" for i in range(4 * n)],
        }
    )
    images = flat_images(np.concatenate([bright, dark, mixed_a, mixed_b]))
    result = probes.feature_collection_aucs(model, images, frame, seed=0)
    assert result["normal"]["collections"] == ["kermany", "radiography"] and result["normal"]["images"] == 2 * n
    assert result["normal"]["auc"] > 0.99  # the feature (brightness) tells the collections apart
    assert 0.25 < result["covid"]["auc"] < 0.75  # same brightness distribution: chance


def test_shortcut_aucs_of_a_set_and_per_source():
    rng = np.random.default_rng(1)
    n = 30
    frame = pd.DataFrame(
        {
            "label": ["normal"] * n + ["covid"] * n,
            "patient_id": [f"p{i}" for i in range(2 * n)],
            "orig_width": [512] * n + list(rng.integers(800, 3000, n)),
            "orig_height": [512] * n + [1000] * n,
            "orig_format": ["JPEG"] * n + ["PNG"] * n,
            "orig_mode": ["L"] * (2 * n),
        }
    )
    stored = rng.integers(0, 256, (2 * n, 16, 16)).astype(np.uint8)
    aucs = probes.shortcut_aucs(frame, stored, seed=0)
    assert aucs["geometry_format"] > 0.95 and 0.2 < aucs["pixel_stats"] < 0.8

    rows = pd.DataFrame(
        {
            "label": ["covid", "covid", "covid", "normal", "normal"],
            "source": ["ieee8023", "ieee8023", "radiography", "kermany", "kermany"],
        }
    )
    table = probes.per_source(rows, ["covid", "normal", "covid", "covid", "normal"], ["normal", "covid"])
    assert table == {
        "covid/ieee8023": {"images": 2, "sensitivity": 0.5},
        "covid/radiography": {"images": 1, "sensitivity": 1.0},
        "normal/kermany": {"images": 2, "specificity": 0.5},
    }


# ---------- held-out groups, the shortcut baseline, calibration draws ----------

DEFAULT_ROLES = {"train": {"covid": ["ieee8023", "radiography"], "normal": ["kermany", "radiography"]}}
CLASSES = ["normal", "covid"]


def test_default_groups_follow_the_training_collections():
    assert loco_groups.default_groups(DEFAULT_ROLES, CLASSES) == (("radiography",), ("ieee8023", "kermany"))
    tutorial = {
        "train": {"covid": ["ieee8023"], "normal": ["kermany"]},
        "external": {"covid": ["radiography"], "normal": ["radiography"]},
    }
    assert loco_groups.default_groups(tutorial, CLASSES) == (("radiography",),)  # the pair itself cannot be held out
    adult = {
        "train": {"covid": ["ieee8023"], "normal": ["radiography"]},
        "external": {"covid": ["radiography"], "normal": ["kermany"]},
    }
    assert loco_groups.default_groups(adult, CLASSES) == (("kermany",),)  # a one-class group, the only one possible
    site = {"train": {"covid": ["ieee8023", "radiography", "h1"], "normal": ["kermany", "radiography", "h1"]}}
    assert loco_groups.default_groups(site, CLASSES) == (("h1",), ("radiography",), ("ieee8023", "kermany"))


@pytest.mark.parametrize(
    "groups, message",
    [
        ("[[radiography],[chexpert]]", r"loco.groups\[1\]: unknown collection 'chexpert' \(allowed: ieee8023, kermany"),
        ("[[kermany,kermany]]", r"loco.groups\[0\]: names kermany twice \(allowed: each of ieee8023"),
        ("[[ieee8023,radiography]]", r"loco.groups\[0\]=\['ieee8023', 'radiography'\]: .*leaves class covid with no"),
        ("[]", r"loco.groups: a non-empty list"),
    ],
)
def test_bad_groups_fail_before_training(groups, message):
    from covidxray.settings.loco import loco_settings

    with pytest.raises(CovidXrayError, match=message):
        loco_settings(make_cfg([f"loco.groups={groups}"]))
    assert loco_settings(make_cfg(["loco.groups=[[ieee8023],[kermany]]"])).spec.groups == (("ieee8023",), ("kermany",))


def test_shortcut_baseline_on_a_known_case():
    """Covid images are brighter, geometry is the same for all: pixel statistics separate the
    classes perfectly, geometry not at all; the baseline is the better of the two."""
    rng = np.random.default_rng(0)
    n = 30
    frame = pd.DataFrame(
        {
            "label": ["normal"] * n + ["covid"] * n,
            "patient_id": [f"p{i}" for i in range(2 * n)],
            "orig_width": 512,
            "orig_height": 512,
            "orig_format": "PNG",
            "orig_mode": "L",
        }
    )
    stored = np.concatenate([rng.integers(20, 60, (n, 16, 16)), rng.integers(180, 220, (n, 16, 16))]).astype(np.uint8)
    found = loco.shortcut_baseline(frame, stored, seed=0)
    assert found["pixel_stats"] == pytest.approx(1.0) and found["geometry_format"] == pytest.approx(0.5)
    assert found["auc"] == pytest.approx(1.0)
    assert loco.shortcut_baseline(frame.iloc[:n], stored[:n], 0)["auc"] is None  # one class: no baseline


def test_calibration_draws_on_a_known_case():
    """Scores separate the classes perfectly but sit far above the transferred threshold (0.5:
    specificity 0): any K balanced images calibrate a threshold between the classes (Youden's
    first maximum: the lowest drawn positive), so every other negative is called negative."""
    positive = np.array([True] * 40 + [False] * 40)
    scores = np.concatenate([np.linspace(0.95, 0.99, 40), np.linspace(0.80, 0.90, 40)])
    patients = [f"p{i}" for i in range(80)]
    assert calibration.operating_point(positive, scores, 0.5) == {"sensitivity": 1.0, "specificity": 0.0}
    found = calibration.calibration_draws(positive, scores, patients, 20, 10, "youden", 0.9, seed=0)
    assert found["specificity_mean"] == 1.0 and found["specificity_sd"] == 0.0 and found["draws"] == 10
    assert 0.8 < found["sensitivity_mean"] <= 1.0 and 0.95 <= found["threshold_mean"] < 0.97
    assert calibration.calibration_draws(positive[:45], scores[:45], patients[:45], 20, 3, "youden", 0.9, 0) is None
    with pytest.raises(CovidXrayError, match="4 positive image"):
        calibration.site_threshold(positive[36:], scores[36:], "youden", 0.9)


def test_positives_needed_is_the_smallest_n_whose_n_of_n_passes():
    needed = calibration.positives_needed(0.9, 0.95)
    assert needed == 29  # 0.05 ** (1 / n) >= 0.9 from n = 29 on
    assert calibration.sensitivity_lower_bound(29, 29, 0.95) >= 0.9 > calibration.sensitivity_lower_bound(28, 28, 0.95)
    assert calibration.sensitivity_lower_bound(0, 10, 0.95) == 0.0
    assert calibration.positives_needed(1.0, 0.95) is None
    with pytest.raises(
        CovidXrayError, match=r"10 positive image\(s\); sensitivity 0.9 at 0.95 confidence needs at least 29"
    ):
        calibration.check_positives(10, 0.9, 0.95, "the set")


def test_the_bound_threshold_is_the_highest_whose_lower_bound_reaches_the_target():
    rng = np.random.default_rng(3)
    positive = np.array([True] * 40 + [False] * 40)
    scores = rng.random(80)
    threshold = calibration.site_threshold(positive, scores, "sensitivity", 0.8, confidence=0.95)
    assert calibration.bound_at(positive, scores, threshold, 0.95) >= 0.8
    higher = np.sort(scores[positive])[np.sort(scores[positive]) > threshold]
    assert calibration.bound_at(positive, scores, higher[0], 0.95) < 0.8  # the next one up misses it
    # without a confidence: the target on the positives as found (a threshold no lower)
    assert calibration.site_threshold(positive, scores, "sensitivity", 0.8) >= threshold


def test_the_bound_rule_keeps_its_promise_over_draws_where_the_point_rule_does_not():
    """Overlapping classes, K = 60 (30 positives, enough for 0.9 at 0.95): the target taken on the
    lower bound holds on the rest in at least 90% of draws; taken on the 30 positives as found,
    about half the time (the point estimate is right on average, the promise is not)."""
    rng = np.random.default_rng(0)
    positive = np.repeat([True, False], 1000)
    scores = np.concatenate([rng.normal(1, 1, 1000), rng.normal(-1, 1, 1000)])
    found = calibration.calibration_draws(positive, scores, np.arange(2000), 60, 200, "sensitivity", 0.9, 0, 0.95)
    assert (found["positives"], found["positives_needed"], found["confidence"]) == (30, 29, 0.95)
    assert found["target_held"] >= 0.9 and found["point_rule"]["target_held"] < 0.7
    assert found["sensitivity_mean"] > found["point_rule"]["sensitivity_mean"]
    assert found["specificity_mean"] < found["point_rule"]["specificity_mean"]  # the price of the promise
    with pytest.raises(CovidXrayError, match=r"K = 20 \(10 positives\).*needs at least 29"):
        calibration.calibration_draws(positive, scores, np.arange(2000), 20, 5, "sensitivity", 0.9, 0, 0.95)


def test_a_k_too_small_for_the_target_fails_before_training():
    from covidxray.settings.loco import loco_settings

    with pytest.raises(
        CovidXrayError, match=r"loco.calibration.k must be an integer >= 58.*needs 29 positives, got 20"
    ):
        loco_settings(make_cfg(["loco.calibration.k=20"]))
    with pytest.raises(CovidXrayError, match=r"loco.calibration.confidence must be null or a number in \(0, 1\)"):
        loco_settings(make_cfg(["loco.calibration.confidence=1.5"]))
    assert loco_settings(make_cfg(["loco.calibration.k=20", "loco.calibration.method=youden"])).spec.calibration_k == 20
    assert (
        loco_settings(
            make_cfg(["loco.calibration.k=20", "loco.calibration.confidence=null"])
        ).spec.calibration_confidence
        is None
    )


# ---------- the stage end to end ----------

# 3 positives per draw: sensitivity 0.5 at 0.8 confidence needs 3 (0.9 at 0.95 would need 29)
LOCO = [
    "loco.calibration.k=6",
    "loco.calibration.draws=5",
    "loco.calibration.target_sensitivity=0.5",
    "loco.calibration.confidence=0.8",
]


@pytest.fixture(scope="module")
def loco_run(tmp_path_factory, tiny_data):
    """evaluate then loco on the smoke recipe (trained on every collection); one radiography image
    is made a near-duplicate of a training image (same dup_group), another shares a training
    image's patient, and a small probe set is added to the curated store."""
    from covidxray.stages import evaluate, loco as stage

    tiny = trained_model(tmp_path_factory.mktemp("trained"), tiny_data)
    root = tmp_path_factory.mktemp("loco")
    curated, reports = root / "curated", root / "reports"
    shutil.copytree(tiny["curated"], curated)
    shutil.copytree(tiny["reports"], reports)
    index = pd.read_csv(curated / "index.csv")
    splits = pd.read_csv(tiny["splits"])
    cv_covid = splits[(splits.partition == "cv") & splits.image_id.str.match(r"^covid-")].image_id.tolist()
    at = {i: index.index[index["image_id"] == i][0] for i in ("radiography-covid-000", "radiography-normal-000")}
    index.loc[at["radiography-covid-000"], "dup_group"] = cv_covid[0]  # near-duplicates a training image
    index.loc[at["radiography-normal-000"], "patient_id"] = index.loc[index.image_id == cv_covid[1], "patient_id"].iloc[
        0
    ]
    index.to_csv(curated / "index.csv", index=False)
    rng = np.random.default_rng(5)
    np.save(curated / "probe.npy", rng.integers(0, 256, (6, 32, 32)).astype(np.uint8))
    pd.DataFrame(
        {
            "image_id": [f"ieee8023-o{i}" for i in range(6)],
            "finding": ["ARDS"] * 3 + ["Klebsiella"] * 3,
            "patient_id": [f"ieee8023-q{i}" for i in range(6)],
            "label": "other",
            "source": "ieee8023",
        }
    ).to_csv(curated / "probe.csv", index=False)
    cfg = make_cfg(overrides({**tiny, "curated": curated}, reports, LOCO))
    evaluate.main(cfg)
    headline = stage.main(cfg)
    return {
        "tiny": tiny,
        "cfg": cfg,
        "reports": reports,
        "curated": curated,
        "splits": splits,
        "headline": headline,
        "metrics": json.loads((reports / "loco" / "metrics.json").read_text()),
        "details": json.loads((reports / "loco" / "details.json").read_text()),
        "predictions": pd.read_csv(reports / "loco" / "predictions.csv"),
    }


def test_each_group_trains_on_the_others_and_is_measured_on_itself(loco_run):
    pred, splits = loco_run["predictions"], loco_run["splits"].set_index("image_id")
    assert list(pred.groupby("group", sort=False).groups) == ["radiography", "ieee8023+kermany"]
    for group, held_sources in (("radiography", {"radiography"}), ("ieee8023+kermany", {"ieee8023", "kermany"})):
        rows = pred[pred.group == group]
        train, held = rows[rows.role == "train"], rows[rows.role == "held_out"]
        assert set(held.source) == held_sources and not set(train.source) & held_sources
        assert (splits.loc[train.image_id, "partition"] == "cv").all()  # the recipe's own training images
        assert not set(train.patient_id) & set(held.patient_id)  # no patient in both roles
        assert not set(train.dup_group) & set(held.dup_group)  # nor a near-duplicate group
        assert held.score.between(0, 1).all() and train.score.isna().all()
    held = pred[(pred.group == "radiography") & (pred.role == "held_out")]
    assert len(held) == 18 and loco_run["details"]["groups"]["radiography"]["dropped_shared_with_training"] == 2
    moved = splits.loc[["radiography-covid-000", "radiography-normal-000"], "partition"] == "cv"
    dropped = loco_run["details"]["groups"]["ieee8023+kermany"]["dropped_shared_with_training"]
    assert dropped == int(moved.sum())  # the ieee8023 images they share with are dropped where they train
    assert len(pred[(pred.group == "ieee8023+kermany") & (pred.role == "held_out")]) == 60 - dropped


def test_loco_metrics_are_the_headline_with_baselines(loco_run):
    m, details = loco_run["metrics"], loco_run["details"]
    assert m == {
        k: v if v is None or isinstance(v, int) else float(f"{v:.4g}") for k, v in loco_run["headline"].items()
    }
    for key in ("loco_auc_mean", "loco_auc_worst", "loco_margin_worst", "loco_calibrated_specificity_mean"):
        assert key in m
    # tiny_data's synthetic classes differ in pixel statistics (shortcut baseline 1): no group counts in
    # the objective, so the headline has every group's mean (auc_all) and no auc
    assert m["loco_groups_counted"] == 0 and m["loco_auc_mixed_mean"] is None
    shown = json.loads((loco_run["reports"] / "loco" / "headline.json").read_text())
    assert "auc" not in shown and "auc_min" not in shown and shown["n"] == 0
    assert all(not g["counted"] and "class is collection" in g["counted_why"] for g in details["groups"].values())
    for name in ("radiography", "ieee8023-kermany"):
        for figure in ("auc", "shortcut_auc", "margin", "sensitivity", "specificity"):
            assert f"loco_{name}_{figure}" in m
        g = details["groups"][name.replace("-", "+")]
        assert g["margin"] == pytest.approx(g["auc"] - g["shortcut_auc"], abs=1e-3)
        assert g["auc_ci_low"] <= g["auc"] <= g["auc_ci_high"]
        assert g["calibrated"]["k"] == 6 and g["calibrated"]["draws"] == 5
        cal = g["calibrated"]
        assert (cal["confidence"], cal["positives"], cal["positives_needed"]) == (0.8, 3, 3)
        assert 0 <= cal["target_held"] <= 1 and 0 <= cal["point_rule"]["target_held"] <= 1
        assert m[f"loco_{name}_calibrated_specificity"] == pytest.approx(cal["specificity_mean"], abs=1e-3)
        a = g["adaptation"]  # without labels: the group's own features aligned to the training rows'
        assert a["auc"] == pytest.approx(g["auc"], abs=1e-3) and 0 <= a["auc_adapted"] <= 1
        assert a["specificity"] == pytest.approx(g["specificity"], abs=1e-3) and 0 <= a["specificity_adapted"] <= 1
    assert "loco_calibrated_target_held_mean" in m
    report = (loco_run["reports"] / "loco" / "report.md").read_text()
    assert "## Calibration that keeps its promise" in report and "## Site adaptation from unlabeled images" in report
    assert "| radiography | lower bound |" in report and "| radiography | as found |" in report
    assert m["loco_auc_worst"] == min(details["groups"][g]["auc"] for g in details["groups"])
    per = details["groups"]["ieee8023+kermany"]["per_collection"]
    assert set(per) == {"covid/ieee8023", "normal/kermany"} and "sensitivity" in per["covid/ieee8023"]
    assert set(details["internal_test_per_collection"]) == {
        "covid/ieee8023",
        "normal/kermany",
        "covid/radiography",
        "normal/radiography",
    }
    assert details["probes"]["same_source_other_finding"]["images"] == 6
    rows = {p.stem: json.loads(p.read_text()) for p in (loco_run["reports"] / "loco" / "groups").glob("*.json")}
    assert set(rows) == {"radiography", "ieee8023-kermany"}  # one row per group in `dvc metrics show`
    for stem, row in rows.items():
        assert row["auc"] == m[f"loco_{stem}_auc"] and row["base"] == m[f"loco_{stem}_shortcut_auc"]
        assert row["n"] == details["groups"][stem.replace("-", "+")]["n_images"] and "spec_cal" in row
    roc = pd.read_csv(loco_run["reports"] / "loco" / "plots" / "roc.csv")
    assert set(roc["group"]) == {"radiography", "ieee8023+kermany"}
    assert not list(loco_run["reports"].glob(".loco-*"))


def _floats(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            yield from _floats(v)
    elif isinstance(value, float):
        yield value


def test_every_figures_file_keeps_four_significant_digits(loco_run):
    """Issue 23: the metrics files of train, evaluate and loco (committed, or DVC metrics) round
    every figure to 4 significant digits, so a rerun on another CPU leaves them unchanged; counts
    are integers; MLflow keeps the full precision."""
    import mlflow

    reports = loco_run["reports"]
    names = ["metrics.json", "headline.json", "cv/metrics.json", "cv/headline.json"]
    names += ["loco/metrics.json", "loco/headline.json", "loco/details.json", "loco/groups/radiography.json"]
    for name in names:
        found = list(_floats(json.loads((reports / name).read_text())))
        assert found and all(float(f"{x:.4g}") == x for x in found), name
    cv = json.loads((reports / "cv" / "metrics.json").read_text())
    assert isinstance(cv["final_epochs"], int) and isinstance(
        loco_run["details"]["groups"]["radiography"]["n_images"], int
    )
    mlflow.set_tracking_uri(loco_run["tiny"]["tracking_uri"])
    logged = mlflow.get_run(loco_run["tiny"]["run_id"]).data.metrics
    assert any(float(f"{v:.4g}") != v for k, v in logged.items() if k.startswith("loco_"))


def test_model_card_leads_with_loco(loco_run):
    text = (loco_run["reports"] / "model_card.md").read_text()
    lead = text.index("## At a site it never saw: leave-one-collection-out")
    study = text.index("## What the study showed")  # first; no study run here: it says so
    assert study < lead and "No study yet (reports/study/study.json)" in text[study:lead]
    assert lead < text.index("## Internal figures") < text.index("## Per collection") < text.index("## Shortcut probes")
    table = text[lead : text.index("## Internal figures")]
    for row in ("| radiography |", "| ieee8023+kermany |", "| **mean** |", "| **worst** |", "shortcut baseline"):
        assert row in table, row
    assert "calibrated on 6 site images" in table
    assert (loco_run["reports"] / "loco" / "report.md").read_text().startswith("# Leave-one-collection-out")


def test_loco_logged_on_the_training_run(loco_run):
    import mlflow

    tiny = loco_run["tiny"]
    mlflow.set_tracking_uri(tiny["tracking_uri"])
    run = mlflow.get_run(tiny["run_id"])
    assert run.data.metrics["loco_auc_mean"] == pytest.approx(loco_run["metrics"]["loco_auc_mean"], abs=5e-4)
    assert "loco_radiography_shortcut_auc" in run.data.metrics
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(tiny["run_id"], "loco")}
    assert {"loco/metrics.json", "loco/report.md", "loco/details.json"} <= names
    assert run.data.metrics["loco_seconds"] > 0  # timings go to MLflow, never into the DVC outputs
    assert "seconds" not in (loco_run["reports"] / "loco" / "details.json").read_text()
    assert "took" not in (loco_run["reports"] / "loco" / "report.md").read_text()

    # the model card, stamped with what the DVC output cannot carry, is an artifact of the run
    client = mlflow.MlflowClient()
    logged = client.download_artifacts(tiny["run_id"], "model_card.md", str(loco_run["reports"].parent / "card"))
    logged = Path(logged).read_text()
    written = (loco_run["reports"] / "model_card.md").read_text().splitlines()
    meta = tiny["meta"]
    model = f"{meta['registered_model']} version {meta['registered_version']}"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = next(line for line in logged.splitlines() if line.startswith(f"| {model} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == [tiny["run_id"], commit] and "data.dvc:data/external" in cells[3]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", cells[4])
    lines = logged.splitlines()
    assert lines[:1] + lines[5:] == written and lines[4] == row  # the same card, the table under its title
    # the LOCO headline as tags of the registered version: columns of the versions table
    tags = client.get_model_version(meta["registered_model"], str(meta["registered_version"])).tags
    for key in ("loco_auc_mean", "loco_auc_worst", "loco_margin_worst", "loco_calibrated_specificity_mean"):
        assert tags[key] == f"{loco_run['metrics'][key]:.4g}", key


def test_a_one_class_group_reports_sensitivity_only(tiny_data):
    from covidxray.settings.loco import loco_settings

    s = loco_settings(make_cfg(["experiment=smoke", "loco.groups=[[ieee8023]]", "evaluate.bootstrap=50", *LOCO]))
    result = loco.run(tiny_data["curated"], tiny_data["splits"], s.recipe, s.spec, s.seed)
    g = result["groups"]["ieee8023"]
    assert g["classes_present"] == ["covid"] and "sensitivity" in g and "auc" not in g and "specificity" not in g
    assert "one class only (covid): sensitivity only" in g["note"]
    assert result["summary"]["loco_auc_mean"] is None
    assert card.loco_table(result, 6)[2].startswith("| ieee8023 | covid: radiography; normal: kermany, radiography |")


def test_presets_compose():
    reverse = make_cfg(["experiment=cross_dataset_reverse"])
    assert dict(reverse.data.sources.train) == {"covid": ["radiography"], "normal": ["radiography"]}
    assert dict(reverse.data.sources.external) == {"covid": ["ieee8023"], "normal": ["kermany"]}
    tutorial = make_cfg(["experiment=tutorial_sources"])
    assert dict(tutorial.data.sources.train) == {"covid": ["ieee8023"], "normal": ["kermany"]}
    default = make_cfg([])
    assert dict(default.data.sources.train) == {
        "covid": ["ieee8023", "radiography"],
        "normal": ["kermany", "radiography"],
    }


def test_training_with_a_collection_in_both_roles_fails_fast():
    from covidxray.settings.train import train_settings

    with pytest.raises(CovidXrayError, match=r"\['kermany'\] are in both roles for class 'normal'"):
        train_settings(make_cfg(["experiment=tutorial_sources", "data.sources.external.normal=[kermany]"]))
    with pytest.raises(CovidXrayError, match="data.sources.train.covid: unknown collection 'chexpert'"):
        train_settings(make_cfg(["data.sources.train.covid=[chexpert]"]))


def test_an_optuna_sweep_selects_on_the_loco_mean(tiny_data, tmp_path):
    """`hparams_search=optuna` (objective loco_auc_mixed_mean) at smoke size, 2 trials: each trial's
    return value is its leave-one-collection-out mean AUC, logged on its run, and the study's best
    value is the best of them."""
    import os
    import subprocess

    import yaml

    from conftest import BIN, REPO

    sweep, store = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [
            str(BIN / "covidxray"),
            "train",
            "hparams_search=optuna",
            "experiment=smoke",
            "hydra.sweeper.n_trials=2",
            "loco.groups=[[radiography]]",  # one group keeps it short; the mean is then that group's AUC
            "loco.objective.max_shortcut_auc=1.0",  # counted although tiny_data's classes differ in pixel statistics
            "loco.objective.min_images=10",
            "evaluate.bootstrap=50",
            *LOCO,
            f"paths.curated={tiny_data['curated']}",
            f"paths.splits={tiny_data['splits']}",
            f"mlflow.tracking_uri={store}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},  # no earlier test's store
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values = [json.loads((sweep / job / "reports" / "cv" / "metrics.json").read_text()) for job in ("0", "1")]
    assert all(
        v["loco_auc_mixed_mean"] == v["loco_radiography_auc"] and "loco_radiography_shortcut_auc" in v for v in values
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(max(v["loco_auc_mixed_mean"] for v in values), rel=1e-3)  # files: 4 significant digits
