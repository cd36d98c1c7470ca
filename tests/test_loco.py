"""The external stage and the shortcut probes: constructed cases with known answers, and the stage
end to end on the smoke model (real training, real MLflow store) with its model card."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import make_cfg
from covidxray import CovidXrayError
from covidxray.evaluation import probes
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


# ---------- the stage end to end ----------


@pytest.fixture(scope="module")
def external_run(tmp_path_factory, tiny_data):
    """evaluate then external on the smoke model; one radiography image is made a near-duplicate of
    a training image (same dup_group), and a small probe set is added to the curated store."""
    from covidxray.stages import evaluate, external

    tiny = trained_model(tmp_path_factory.mktemp("trained"), tiny_data)
    root = tmp_path_factory.mktemp("external")
    curated, reports = root / "curated", root / "reports"
    shutil.copytree(tiny["curated"], curated)
    shutil.copytree(tiny["reports"], reports)
    index = pd.read_csv(curated / "index.csv")
    copy = index.index[index["image_id"] == "radiography-covid-000"][0]
    index.loc[copy, "dup_group"] = "covid-000"
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
    cfg = make_cfg(overrides({**tiny, "curated": curated}, reports))
    evaluate.main(cfg)
    external.main(cfg)
    return {
        "tiny": tiny,
        "cfg": cfg,
        "reports": reports,
        "curated": curated,
        "metrics": json.loads((reports / "external" / "metrics.json").read_text()),
    }


def test_external_metrics_figures_and_near_duplicate_rule(external_run):
    m, reports = external_run["metrics"], external_run["reports"]
    assert m["n_external_images"] == 19 and m["external_near_duplicates_dropped"] == 1  # 20 radiography - 1 copy
    for key in ("auc", "sensitivity", "specificity", "brier", "ece"):
        assert key in m["external"] and f"{key}_ci_low" in m["external"]
    for name in ("roc", "precision_recall", "calibration", "confusion"):
        assert (reports / "external" / "plots" / f"{name}.csv").is_file()
    for name in ("roc", "precision_recall", "calibration", "confusion", "gradcam"):
        assert (reports / "external" / "figures" / f"{name}.png").is_file()
    assert set(m["per_source"]["external"]) == {"covid/radiography", "normal/radiography"}
    assert set(m["per_source"]["internal test"]) == {"covid/ieee8023", "normal/kermany"}
    probe = m["probes"]["same_source_other_finding"]
    assert probe["images"] == 6 and set(probe["per_finding"]) == {"ARDS", "Klebsiella"}
    assert set(m["probes"]["shortcut_auc"]) == {"training set", "external set"}
    assert set(m["probes"]["feature_collection_auc"]) == {"normal", "covid"}
    assert not list(reports.glob(".external-*"))


def test_model_card_leads_with_internal_vs_external(external_run):
    text = (external_run["reports"] / "model_card.md").read_text()
    headline = text.index("## Internal vs external")
    assert headline < text.index("## Per source") < text.index("## Shortcut probes")
    table = text[headline : text.index("## Per source")]
    for row in (
        "| internal CV (out-of-fold) |",
        "| internal test |",
        "| **external** | 19 |",
        "| gap (external - internal test) |",
    ):
        assert row in table, row
    assert "covid/radiography" in text and "Same source, other finding" in text


def test_external_logged_on_the_training_run(external_run):
    import mlflow

    tiny = external_run["tiny"]
    mlflow.set_tracking_uri(tiny["tracking_uri"])
    run = mlflow.get_run(tiny["run_id"])
    assert "external_auc" in run.data.metrics and "external_probes_same_source_other_finding_images" in run.data.metrics
    assert "auc" not in {k for k in run.data.metrics if k.startswith("external_external")}
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(tiny["run_id"], "external")}
    assert {"external/metrics.json", "external/report.md", "external/figures"} <= names


REVERSE = [
    "data.sources.train.covid=[radiography]",
    "data.sources.train.normal=[radiography]",
    "data.sources.external.covid=[ieee8023]",
    "data.sources.external.normal=[kermany]",
]


def test_roles_other_than_the_models_fail_before_writing(external_run, tmp_path):
    from covidxray.stages import external

    reports = tmp_path / "reports"
    shutil.copytree(external_run["reports"], reports)
    before = (reports / "model_card.md").read_text()
    reverse = make_cfg(overrides({**external_run["tiny"], "curated": external_run["curated"]}, reports, REVERSE))
    with pytest.raises(CovidXrayError, match=r"data.sources \(train covid: radiography.*differ from the model's"):
        external.main(reverse)
    assert (reports / "model_card.md").read_text() == before and not list(reports.glob(".external-*"))


def test_reverse_preset_composes_to_the_other_direction():
    cfg = make_cfg(["experiment=cross_dataset_reverse"])
    assert dict(cfg.data.sources.train) == {"covid": ["radiography"], "normal": ["radiography"]}
    assert dict(cfg.data.sources.external) == {"covid": ["ieee8023"], "normal": ["kermany"]}


def test_reverse_direction_trains_and_evaluates_at_smoke_size(tiny_data, tmp_path):
    """Trained on radiography (the smoke model, 2 folds), measured on the tutorial's collections."""
    from covidxray.stages import evaluate, external, train

    dirs = {
        "curated": tiny_data["curated"],
        "splits": tiny_data["splits"],
        "models": tmp_path / "models",
        "reports": tmp_path / "reports",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    cfg = make_cfg(overrides(dirs, extra=REVERSE))
    train.main(cfg)
    evaluate.main(cfg)
    external.main(cfg)
    m = json.loads((tmp_path / "reports" / "external" / "metrics.json").read_text())
    assert m["n_external_images"] == 60  # all 30 + 30 ieee8023/kermany images, cv and test partitions
    assert set(m["per_source"]["external"]) == {"covid/ieee8023", "normal/kermany"}
    oof = pd.read_csv(tmp_path / "reports" / "cv" / "oof.csv")
    assert oof["image_id"].str.startswith("radiography-").all()


def test_training_with_a_collection_in_both_roles_fails_fast():
    from covidxray.settings import train_settings

    with pytest.raises(CovidXrayError, match=r"\['kermany'\] are in both roles for class 'normal'"):
        train_settings(make_cfg(["data.sources.external.normal=[kermany]"]))
    with pytest.raises(CovidXrayError, match="data.sources.train.covid: unknown collection 'chexpert'"):
        train_settings(make_cfg(["data.sources.train.covid=[chexpert]"]))
