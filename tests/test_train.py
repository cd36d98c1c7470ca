"""train stage: the smoke experiment through the real TensorFlow stack into a real MLflow store;
a Hydra multirun; the frozen-feature cache gives the same model as training on images."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, REPO, frozen_head_settings, make_cfg


@pytest.fixture
def trained(smoke_cfg, tmp_path):
    """The smoke experiment trained once, with 2 epochs so per-epoch curves have 2 steps."""
    from covidxray.stages.train import main

    smoke_cfg.train.epochs = 2
    value = main(smoke_cfg)
    return {"cfg": smoke_cfg, "value": value, "root": tmp_path}


def _client(cfg):
    import mlflow

    from covidxray.infra import tracking

    tracking.configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    return mlflow.tracking.MlflowClient()


def test_smoke_training_end_to_end(trained):
    import keras
    import mlflow

    from covidxray.evaluation.metrics import choose_threshold

    cfg, root = trained["cfg"], trained["root"]
    models_dir, cv_dir = root / "models", root / "reports" / "cv"
    for path in (
        models_dir / "model.keras",
        models_dir / "model.json",
        cv_dir / "oof.csv",
        cv_dir / "metrics.json",
        cv_dir / "history.csv",
    ):
        assert path.is_file(), path

    metrics = json.loads((cv_dir / "metrics.json").read_text())
    assert math.isclose(trained["value"], metrics["cv_auc_mean"], rel_tol=1e-3)  # the file: 4 significant digits
    for key in (
        "cv_auc_mean",
        "cv_auc_std",
        "cv_accuracy_mean",
        "cv_loss_mean",
        "oof_auc",
        "oof_accuracy",
        "oof_sensitivity",
        "oof_specificity",
        "threshold",
    ):
        assert math.isfinite(metrics[key]), key

    # OOF predictions: every CV image once, none of the test partition; the threshold is theirs.
    splits = pd.read_csv(cfg.paths.splits, dtype={"image_id": str})
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"image_id": str, "patient_id": str})
    assert list(oof.columns) == ["image_id", "patient_id", "label", "y", "fold", "p_normal", "p_covid"]
    # the default trains on every collection: the cv partition of all of them
    assert sorted(oof["image_id"]) == sorted(splits.loc[splits["partition"] == "cv", "image_id"])
    assert np.allclose(oof[["p_normal", "p_covid"]].sum(axis=1), 1.0, atol=1e-5)
    from covidxray.networks.model_file import RUN_KEYS, read_meta

    meta = read_meta(models_dir / "model.keras")  # model.json with model.run.json (run, version)
    assert not set(RUN_KEYS) & set(json.loads((models_dir / "model.json").read_text()))  # same every run
    assert meta["threshold"] == choose_threshold(oof["label"] == "covid", oof["p_covid"], "youden")
    assert meta["classes"] == ["normal", "covid"] and meta["image_size"] == 32
    assert meta["resize"] == cfg.data.resize and meta["threshold_method"] == "youden"
    assert meta["model"] == "small_cnn"

    history = pd.read_csv(cv_dir / "history.csv")
    assert list(history.columns[:8]) == [
        "fold",
        "epoch",
        "loss",
        "val_loss",
        "accuracy",
        "val_accuracy",
        "auc",
        "val_auc",
    ]
    assert sorted(history["fold"].unique()) == [0, 1] and list(history["epoch"][:2]) == [1, 2]

    # MLflow: one parent run with params, aggregates, tags and config; K nested fold runs.
    client = _client(cfg)
    parent = client.get_run(meta["mlflow_run_id"])
    assert parent.data.params["model.name"] == "small_cnn"
    assert parent.data.params["train.epochs"] == "2"
    assert parent.data.params["data.image_size"] == "32"
    for key in ("cv_auc_mean", "cv_auc_std", "oof_auc", "oof_sensitivity", "oof_specificity", "threshold"):
        assert math.isfinite(parent.data.metrics[key]), key
    tags = parent.data.tags
    assert tags["git_commit"] and tags["git_dirty"] in ("true", "false", "unknown")
    assert any(k.startswith("data_version.") for k in tags)
    assert tags["runner"] in ("python", "dvc")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "model.json", "cv", "training_curves.png"} <= artifacts  # every fold's curves
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_auc")]
        assert steps == [1, 2]
        for key in ("loss", "val_loss", "accuracy", "val_accuracy", "auc"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 2, key
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "confusion_matrix.png" in files
        assert child.data.tags["mlflow.source.git.commit"] == tags["mlflow.source.git.commit"]  # the fold's code

    # The registered model is a pyfunc model: image bytes in, p(covid) and the label at the saved
    # threshold out, the same as the .keras file in models/ (serving tests: test_serving.py).
    assert meta["registered_model"] == cfg.mlflow.registered_model and meta["registered_version"] == 1
    from covidxray.networks.inference import png_bytes

    x = np.random.default_rng(1).uniform(0, 255, size=(4, 32, 32)).astype(np.uint8)
    p = keras.models.load_model(models_dir / "model.keras").predict(x.astype(np.float32)[..., None], verbose=0)
    assert p.shape == (4, 2) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    info = mlflow.models.get_model_info(f"models:/{cfg.mlflow.registered_model}/1")
    assert info.metadata["threshold"] == meta["threshold"] and info.metadata["classes"] == ["normal", "covid"]
    assert info.signature is not None and info.saved_input_example_info is not None
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}/1")
    out = pyfunc.predict(pd.DataFrame({"image": [png_bytes(img) for img in x]}))
    assert list(out.columns) == [
        "p_covid",
        "p_normal",
        "label",
        "threshold",
        "model_name",
        "model_version",
        "model_run_id",
        "ood_score",
        "ood",
    ]
    assert out["model_version"].tolist() == ["1"] * 4 and (out["model_run_id"] == meta["mlflow_run_id"]).all()
    assert np.allclose(out["p_covid"], p[:, 1], atol=1e-6) and (out["threshold"] == meta["threshold"]).all()
    called = np.where(p[:, 1] >= meta["threshold"], "covid", "normal")  # noise: flagged unless like the X-rays
    assert out["label"].tolist() == np.where(out["ood"].astype(bool), "out-of-distribution", called).tolist()
    assert (models_dir / "ood.npz").is_file()

    # Run as the pipeline runs it (not a Hydra app): registered, installed, described; the smoke
    # config is not the committed default, so @champion does not move (test_registry.py).
    collections = "+".join(cfg.data.collections)
    assert (
        parent.info.run_name == f"pipeline smoke train.epochs=2 [{collections}] #{tags['config_hash']} (small_cnn-cv2)"
    )
    version = client.get_model_version(cfg.mlflow.registered_model, "1")
    assert version.tags["covidxray.installed"] == "true" and "Research use only" in version.description
    assert "champion" not in client.get_registered_model(cfg.mlflow.registered_model).aliases
    # Provenance written after the install: the md5 of what this run read and wrote, as DVC computes it.
    from covidxray.infra.tracking import dvc_md5

    for path in (models_dir / "model.keras", cv_dir / "metrics.json", root / "reports" / "cv" / "oof.csv"):
        assert tags[f"dvc.md5:{path.resolve().as_posix()}"] == dvc_md5(path), path
    assert not any(k.startswith("data_version.dvc.lock") for k in tags)  # no stale tags of a previous run
    headline = json.loads((cv_dir / "headline.json").read_text())
    assert set(headline) <= {"n", "auc", "auc_sd", "sens", "spec"} and headline["n"] == len(oof)
    assert not any(t in key for key in metrics for t in ("seconds", "wall_s", "images_per_s", "cache_s"))
    assert "cv_seconds" in parent.data.metrics  # timings live in MLflow only


def test_hydra_multirun_makes_one_parent_run_per_job(tiny_data, tmp_path):
    """Two jobs in parallel (joblib launcher) into a store neither has created yet."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    done = subprocess.run(
        [
            str(BIN / "covidxray"),
            "train",
            "-m",
            "hydra/launcher=local_parallel",
            "experiment=smoke",
            "model.head.dense_units=4,8",
            f"paths.curated={tiny_data['curated']}",
            f"paths.splits={tiny_data['splits']}",
            f"mlflow.tracking_uri={store}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = make_cfg([f"mlflow.tracking_uri={store}"])
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    assert sorted(r.data.params["model.head.dense_units"] for r in parents) == ["4", "8"]
    assert {r.data.tags["runner"] for r in parents} == {"hydra-multirun"}
    assert {r.data.tags["hydra_launcher"] for r in parents} == {"JoblibLauncher"}  # 2 jobs at once, one new store
    assert all("model.head.dense_units" in r.data.tags["hydra_overrides"] for r in parents)
    for job in ("0", "1"):  # each job writes into its own output directory
        assert (tmp_path / "sweep" / job / "models" / "model.keras").is_file()
        assert (tmp_path / "sweep" / job / "reports" / "cv" / "metrics.json").is_file()
    # Sweep jobs register nothing (mlflow.register=auto), and their run names say what differs.
    assert client.search_model_versions(f"name='{cfg.mlflow.registered_model}'") == []
    named = {r.data.params["model.head.dense_units"]: (r.info.run_name, r.data.tags["config_hash"]) for r in parents}
    collections = "+".join(cfg.data.collections)
    assert {units: name for units, (name, _) in named.items()} == {
        units: f"smoke model.head.dense_units={units} [{collections}] #{digest} (small_cnn-cv2)"
        for units, (_, digest) in named.items()
    }
    assert named["4"][1] != named["8"][1]
    for job in ("0", "1"):
        from covidxray.networks.model_file import read_meta

        meta = read_meta(tmp_path / "sweep" / job / "models" / "model.keras")
        assert meta["registered_version"] is None and meta["model_uri"].startswith(("runs:/", "models:/m-"))


def test_final_model_trains_the_cv_median_best_epoch():
    """With early stopping, the final model (no validation fold to stop on) trains the median of
    the folds' best epochs, rounded up and at least 1, per phase; without, the configured epochs."""
    from covidxray.training.recipe import final_epochs

    folds = pd.DataFrame({"best_epoch": [3.0, 7.0, 4.0]})
    assert final_epochs([25, 0], folds, early_stopping=True) == [4, 0]
    assert final_epochs([25, 0], pd.DataFrame({"best_epoch": [3.0, 4.0]}), True) == [4, 0]  # 3.5 rounds up
    assert final_epochs([25, 0], pd.DataFrame({"best_epoch": [0.0, 1.0]}), True) == [1, 0]  # at least 1
    fine_tuned = pd.DataFrame({"best_epoch": [2.0, 6.0, 9.0], "best_epoch_fine_tune": [1.0, 2.0, 5.0]})
    assert final_epochs([25, 5], fine_tuned, True) == [6, 2]
    assert final_epochs([25, 5], fine_tuned, early_stopping=False) == [25, 5]


def test_heads_trained_on_cached_features_are_the_full_models_heads(tiny_data):
    """With a frozen base the folds' heads train together on cached features (stacked_heads.py); the full
    model then carries its fold's head: it predicts on images what the head predicts on features.
    Without the cache the same recipe trains the full models with Keras's fit."""
    from covidxray.training import stacked_heads
    from covidxray.training.trainer import Trainer
    from covidxray.training.cv_data import load_cv_data

    s = frozen_head_settings(tiny_data)
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
    fold = data.rows["fold"].to_numpy()
    splits = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in (0, 1)]
    for cached in (True, False):
        trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0, feature_cache=cached)
        assert (trainer.stacked_head(trainer.new_model()) is not None) is cached
        fitted = trainer.cross_validate(splits, [2, 0], labels=[0, 1])
        assert [r.history["phase"].iloc[0] for _, r in fitted] == ["head" if cached else "train"] * 2
        assert all(len(r.history) == 2 and list(r.history["fold"]) == [k] * 2 for k, (_, r) in enumerate(fitted))
        model = trainer.new_model()
        trainer.fit(model, splits[0][0], splits[0][1], [2, 0])
        on_images = model.predict(data.images[splits[0][1]].astype(np.float32)[..., None], verbose=0)
        assert np.allclose(on_images, fitted[0][0], atol=1e-5)  # the fold's model, trained again alike
        if cached:
            pooled = trainer.pooled_features(model)
            assert np.allclose(
                stacked_heads.head_probs(stacked_heads.head_weights(model), pooled[splits[0][1]]), on_images, atol=1e-5
            )


@pytest.mark.parametrize("frozen", [False, True], ids=["keras_fit", "stacked_heads"])
def test_run_eagerly_changes_the_cost_not_the_figures(tiny_data, frozen):
    """train.run_eagerly (the smoke preset's: its fits are a few steps, cheaper than tracing a graph)
    gives what the graph gives: Keras's fit from pixels, and the stacked heads without XLA."""
    from covidxray.training.cv_data import load_cv_data
    from covidxray.training.trainer import Trainer

    found = []
    for eager in (False, True):
        s = frozen_head_settings(tiny_data, f"model.freeze_base={frozen}", f"train.run_eagerly={eager}")
        assert s.fit.run_eagerly is eager
        data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
        fold = data.rows["fold"].to_numpy()
        trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0, feature_cache=frozen)
        ((probs, result),) = trainer.cross_validate(
            [(np.flatnonzero(fold != 0), np.flatnonzero(fold == 0))], [2, 0], [0]
        )
        assert result.history["phase"].iloc[0] == ("head" if frozen else "train")
        found.append((probs, result.history[["loss", "auc"]].to_numpy()))
    assert np.allclose(found[0][0], found[1][0], atol=1e-5) and np.allclose(found[0][1], found[1][1], atol=1e-5)


def test_augmentation_runs_in_the_input_pipeline_for_training_only(tiny_data):
    from covidxray.settings.train import augment_settings
    from covidxray.training.inputs import build_augmenter, make_dataset

    cfg = make_cfg(["augment=standard"])
    augmenter = build_augmenter(augment_settings(cfg), seed=0)
    assert [layer.name for layer in augmenter.layers] == ["affine", "brightness", "contrast"]
    assert [layer.name for layer in build_augmenter(augment_settings(make_cfg(["augment=tutorial"])), 0).layers] == [
        "rotation"
    ]
    images = np.load(tiny_data["curated"] / "images.npy")[:8]
    x, _ = next(iter(make_dataset(images, np.eye(2)[np.zeros(8, int)], None, 8, augmenter=augmenter)))
    plain = next(iter(make_dataset(images, None, None, 8)))
    assert x.shape == plain.shape == (8, 32, 32, 1)
    assert not np.allclose(x.numpy(), plain.numpy())
    assert float(x.numpy().min()) >= 0.0 and float(x.numpy().max()) <= 255.0
    assert np.allclose(plain.numpy()[..., 0], images)
    # The fused warp with nothing to do is the identity; a 90 degree turn moves pixels as expected.
    from covidxray.training.inputs import random_affine_layer as _random_affine_layer

    batch = plain.numpy()
    assert np.allclose(_random_affine_layer()(0.0, 0.0, 0.0)(batch).numpy(), batch, atol=1e-3)
    square = np.zeros((1, 8, 8, 1), np.float32)
    square[0, 0, 0, 0] = 255.0  # top-left corner: a turn by about +-90 degrees moves it to another corner
    turned = _random_affine_layer()(90.0, 0.0, 0.0, seed=1)(np.repeat(square, 16, axis=0)).numpy()
    assert (turned[:, 0, 0, 0] < 255.0).any()
    assert build_augmenter(augment_settings(make_cfg(["augment=none"])), 0) is None


def test_learning_rate_schedules():
    from covidxray.settings.train import fit_settings
    from covidxray.training.trainer import make_optimizer, make_schedule

    tutorial = make_schedule(
        make_cfg(["optimizer.schedule=inverse_time"]).optimizer.schedule, 1e-3, epochs=25, steps_per_epoch=10
    )
    for step in (0, 1, 100):  # the tutorial's Adam(lr=1e-3, decay=1e-3 / 25), per step
        assert math.isclose(float(tutorial(step)), 1e-3 / (1 + 1e-3 / 25 * step), rel_tol=1e-5)
    cosine = make_schedule(
        make_cfg(["optimizer.schedule=cosine"]).optimizer.schedule, 1e-3, epochs=2, steps_per_epoch=5
    )
    assert math.isclose(float(cosine(0)), 1e-3, rel_tol=1e-5) and float(cosine(10)) < 1e-9
    assert make_schedule(make_cfg([]).optimizer.schedule, 1e-3, 25, 10) == 1e-3
    assert type(make_optimizer(fit_settings(make_cfg([])).optimizer, 1e-3, 25, 10)).__name__ == "Adam"


def test_mirrored_strategy_runs_as_one_replica_on_cpu(tiny_data, tmp_path):
    from covidxray.settings.train import train_settings
    from covidxray.training.trainer import Trainer
    from covidxray.training.cv_data import load_cv_data

    s = train_settings(
        make_cfg(
            [
                "experiment=smoke",
                "train.distribute=mirrored",
                f"paths.curated={tiny_data['curated']}",
                f"paths.splits={tiny_data['splits']}",
            ]
        )
    )
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
    trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0)
    assert trainer.strategy.num_replicas_in_sync >= 1
    model = trainer.new_model()
    idx = np.arange(len(data.images))
    result = trainer.fit(model, idx, None, [1, 0])
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"]).all()


def test_three_classes_covid_last(tmp_path):
    """Three classes (data.task=three_class): softmax over 3, OOF columns per class, covid-vs-rest
    threshold; no final model when cv.final_model is off."""
    from conftest import synthetic_xrays
    from covidxray.data.images import save_curated
    from covidxray.stages.split import make_splits
    from covidxray.stages.train import main

    rng = np.random.default_rng(3)
    classes = ["normal", "pneumonia", "covid"]
    rows, arrays = [], []
    for y, label in enumerate(classes):
        arrays.append(synthetic_xrays(16, 32, positive=label == "covid", rng=rng))
        collections = {"normal": ["kermany"], "pneumonia": ["kermany", "ieee8023"], "covid": ["ieee8023"]}[label]
        rows += [
            {
                "image_id": f"{label}-{i}",
                "label": label,
                "y": y,
                "patient_id": f"{label}-p{i}",
                "source": collections[i % len(collections)],
            }
            for i in range(16)
        ]
    index = pd.DataFrame(rows)
    save_curated(tmp_path / "curated", np.concatenate(arrays), index, classes)
    make_splits(index, test_fraction=0.25, folds=2, seed=0).to_csv(tmp_path / "splits.csv", index=False)
    cfg = make_cfg(
        [
            "experiment=smoke",
            "data=three_class",
            "data.sources.train.covid=[ieee8023]",  # the synthetic store has no radiography images
            "data.sources.train.normal=[kermany]",
            "cv.final_model=false",
            f"paths.curated={tmp_path / 'curated'}",
            f"paths.splits={tmp_path / 'splits.csv'}",
            f"paths.models={tmp_path / 'models'}",
            f"paths.reports={tmp_path / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        ]
    )
    assert math.isfinite(main(cfg))
    oof = pd.read_csv(tmp_path / "reports" / "cv" / "oof.csv")
    assert [c for c in oof.columns if c.startswith("p_")] == ["p_normal", "p_pneumonia", "p_covid"]
    assert np.allclose(oof.filter(like="p_").sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((tmp_path / "reports" / "cv" / "metrics.json").read_text())
    assert math.isfinite(metrics["oof_auc"]) and 0.0 <= metrics["threshold"] <= 1.0
    assert not (tmp_path / "models" / "model.keras").exists()
