"""The feature store (training/feature_store.py) and the fast backbone path (training/extraction.py):
computed once per key, hits and misses counted, bad entries named in one line and recomputed, a
full disk leaves nothing half-written; TFLite features equal Keras's; Trainer, inference and the
probes give the same figures through the store as without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covidxray.training.feature_store import FeatureStore, key_digest, open_store, row_ids

KEY = {"model": "toy", "engine": "numpy", "backbone_weights_sha256": "0" * 64}


def toy_features(x: np.ndarray) -> np.ndarray:
    """A real (if simple) feature map: 2x2 block means of each image."""
    n, s, _ = x.shape
    return x.astype(np.float32).reshape(n, 2, s // 2, 2, s // 2).mean(axis=(2, 4))


def images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def store_at(root: Path) -> tuple[FeatureStore, list[str]]:
    lines: list[str] = []
    return FeatureStore(root, log=lines.append), lines


def parts(root: Path, key=KEY) -> list[Path]:
    return sorted((root / key_digest(key)).glob("part-*"))


def test_computed_once_per_key_and_image(tmp_path):
    x = images(10)
    store, lines = store_at(tmp_path)
    calls = []

    def compute(batch):
        calls.append(len(batch))
        return toy_features(batch)

    first = store.lookup(KEY, x, compute)
    assert np.array_equal(first, toy_features(x)) and calls == [10]
    assert (store.hits, store.misses) == (0, 10) and "0 hits, 10 misses" in lines[-1]
    again = FeatureStore(tmp_path, log=lines.append)  # another process: reads the disk
    more = np.concatenate([x[3:7], images(3, seed=1)])
    assert np.array_equal(again.lookup(KEY, more, compute), toy_features(more))
    assert calls == [10, 3] and (again.hits, again.misses) == (4, 3)
    assert len(parts(tmp_path)) == 2 and not list((tmp_path / key_digest(KEY)).glob(".tmp-*"))
    other = {**KEY, "backbone_weights_sha256": "1" * 64}  # other weights: another entry, all misses
    again.lookup(other, x[:2], compute)
    assert calls[-1] == 2 and len(parts(tmp_path, other)) == 1
    manifest = json.loads((parts(tmp_path)[0] / "manifest.json").read_text())
    assert manifest["key"] == key_digest(KEY) and set(manifest["files"]) == {"features.npy", "ids.npy"}
    assert json.loads((tmp_path / key_digest(KEY) / "key.json").read_text()) == KEY


def test_ids_follow_the_pixels():
    x = images(3)
    y = x.copy()
    y[1, 0, 0] ^= 1
    assert (row_ids(x) == row_ids(x.copy())).all()
    assert list(row_ids(x) == row_ids(y)) == [True, False, True]
    assert row_ids(x[:, :4, :4])[0] != row_ids(x)[0]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "manifest"])
def test_bad_part_is_named_removed_and_recomputed(tmp_path, damage):
    x = images(6)
    store, lines = store_at(tmp_path)
    store.lookup(KEY, x, toy_features)
    part = parts(tmp_path)[0]
    if damage == "corrupt":
        data = bytearray((part / "features.npy").read_bytes())
        data[-5] ^= 0xFF
        (part / "features.npy").write_bytes(bytes(data))
    elif damage == "truncated":
        data = (part / "features.npy").read_bytes()
        (part / "features.npy").write_bytes(data[: len(data) // 2])
    elif damage == "foreign":  # a part of another key copied into this entry
        other = {**KEY, "model": "other"}
        store.lookup(other, x, lambda b: toy_features(b) + 1)
        foreign = parts(tmp_path, other)[0]
        (part / "manifest.json").write_text((foreign / "manifest.json").read_text())
    else:
        (part / "manifest.json").write_text("{not json")
    fresh, lines = store_at(tmp_path)
    assert np.array_equal(fresh.lookup(KEY, x, toy_features), toy_features(x))  # never the bad values
    bad = [line for line in lines if "removed, its images are recomputed" in line]
    assert len(bad) == 1 and str(part) in bad[0] and "\n" not in bad[0]
    assert (fresh.hits, fresh.misses) == (0, 6)
    assert len(parts(tmp_path)) == 1  # the recomputed part, whole
    fresh.lookup(KEY, x, toy_features)
    assert fresh.hits == 6


def test_a_full_disk_leaves_nothing_half_written(tmp_path):
    """A file size limit (RLIMIT_FSIZE, as a full disk does: the write fails) while storing: one
    line naming the file, the features still returned, no part or temporary folder left."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_features import KEY, images, toy_features
        from covidxray.training.feature_store import FeatureStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        x = images(40, size=32)
        out = FeatureStore({str(tmp_path)!r}).lookup(KEY, x, lambda b: np.repeat(toy_features(b), 50, axis=1))
        assert out.shape == (40, 100, 2), out.shape
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.returncode == 0, done.stderr
    line = [x for x in done.stdout.splitlines() if "not stored" in x]
    assert len(line) == 1 and "features.npy" in line[0], done.stdout
    entry = tmp_path / key_digest(KEY)
    assert not parts(tmp_path) and not list(entry.glob(".tmp-*"))


def test_tflite_conversion_with_a_full_tmpdir_fails_in_one_line_naming_it(tmp_path):
    """TensorFlow's converter saves a SavedModel under TMPDIR first; where that write fails
    (RLIMIT_FSIZE, as a full disk does) it fell back to a path that raised `TypeError: 'NoneType'
    object is not callable`. Now: one line naming TMPDIR, before converting."""
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from covidxray.infra import quiet
        quiet.install()
        import keras
        from covidxray import CovidXrayError
        from covidxray.training.extraction import convert_tflite
        inputs = keras.Input((32, 32, 1))
        x = keras.layers.Conv2D(256, 3)(keras.layers.Conv2D(256, 3)(inputs))
        extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))  # 2.4 MB of weights
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            convert_tflite(extractor)
        except CovidXrayError as error:
            print("ERROR", error)
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("ERROR")]
    assert len(line) == 1 and str(tmp_path) in line[0] and "TFLite" in line[0], done.stdout + done.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_open_store_checks_its_folder(tmp_path):
    assert open_store(None).root is None and open_store("").root is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="is a file"):
        open_store(tmp_path / "file")


# -- the backbone: engines and consumers ------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_model():
    from covidxray.networks import builders

    cfg = {
        "name": "small_cnn",
        "weights": "none",
        "freeze_base": True,
        "filters": [4, 8],
        "head": {"pool_size": 2, "dense_units": 8, "dropout": 0.5},
    }
    import keras

    keras.utils.set_random_seed(0)
    return builders.build_model(cfg, 32, 2)


def test_tflite_features_equal_keras_and_the_converted_file_is_kept(frozen_model, tmp_path):
    from covidxray.training import extraction

    x = images(12, size=32)
    store, lines = store_at(tmp_path)
    direct = np.asarray(extraction.feature_extractor(frozen_model).predict(x.astype(np.float32)[..., None], verbose=0))
    keras_f = extraction.backbone_features(frozen_model, x, store, engine="keras")
    fast = extraction.backbone_features(frozen_model, x, store, engine="tflite")
    assert np.abs(keras_f - direct).max() == 0.0
    assert np.abs(fast - direct).max() < 1e-4 * max(1.0, np.abs(direct).max())
    key = extraction.feature_key(frozen_model, "tflite")
    blob = tmp_path / key_digest(key) / extraction.TFLITE_FILE
    assert blob.is_file() and key["engine"] == "tflite" and key["model"] == "small_cnn"
    blob.write_bytes(blob.read_bytes()[:100])  # truncated: named, made again
    more = images(2, seed=5, size=32)
    again = extraction.backbone_features(frozen_model, more, store, engine="tflite")
    assert np.abs(again - extraction.backbone_features(frozen_model, more, store, engine="keras")).max() < 1e-3
    assert any(str(blob) in line and "removed, made again" in line for line in lines)


def test_inference_and_probes_through_the_store_match_the_model(frozen_model, tmp_path):
    from covidxray.evaluation.probes import penultimate_features
    from covidxray.training.extraction import probabilities

    x = images(10, size=32)
    store, _ = store_at(tmp_path)
    plain = probabilities(frozen_model, x, 2)
    assert np.allclose(probabilities(frozen_model, x, 2, store=store), plain, atol=1e-6)
    stored = penultimate_features(frozen_model, x, store=store)
    assert np.allclose(stored, penultimate_features(frozen_model, x), atol=1e-5)
    # each image once per key: the maps and the pooled table the head reads; the probe reused the maps
    assert len(set(store.keys)) == 2 and store.misses == 20 and store.hits == 10


def test_trainer_reads_the_store_and_trains_the_same_head(tiny_data, tmp_path):
    """A second Trainer (another sweep point, fold or process) finds every image in the store and
    fits the same model as the first."""
    from conftest import make_cfg

    from covidxray.training.trainer import Trainer
    from covidxray.settings.train import train_settings
    from covidxray.stages.train import load_cv_data

    s = train_settings(
        make_cfg(
            [
                "experiment=smoke",
                "model.freeze_base=true",
                f"paths.curated={tiny_data['curated']}",
                f"paths.splits={tiny_data['splits']}",
                f"paths.features={tmp_path / 'features'}",
            ]
        )
    )
    assert s.fit.feature_store == str(tmp_path / "features")
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
    idx = np.arange(len(data.images))
    probs = []
    for _ in range(2):
        trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0)
        model = trainer.new_model()
        trainer.fit(model, idx, None, [1, 0])
        probs.append(trainer.predict(model, idx))
    assert trainer.store.hits == len(np.unique(row_ids(data.images))) and trainer.store.misses == 0
    assert np.allclose(probs[0], probs[1], atol=1e-6)


def test_training_logs_hits_and_misses_on_its_mlflow_run(tiny_data, tmp_path, capsys):
    """The first training computes every image's features (misses), the next reads them (hits):
    both in the log and as MLflow metrics of the training run."""
    from conftest import make_cfg
    from mlflow.tracking import MlflowClient

    from covidxray.stages.train import run

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    overrides = [
        "experiment=smoke",
        "model.freeze_base=true",
        "cv.final_model=false",
        f"paths.curated={tiny_data['curated']}",
        f"paths.splits={tiny_data['splits']}",
        f"paths.models={tmp_path / 'models'}",
        f"paths.reports={tmp_path / 'reports'}",
        f"paths.features={tmp_path / 'features'}",
        f"mlflow.tracking_uri={uri}",
    ]
    found = [run(make_cfg(overrides)) for _ in range(2)]
    client = MlflowClient(uri)
    first, second = (client.get_run(r["mlflow_run_id"]).data for r in found)
    n = second.metrics["features_hits"]
    # the first computes each image's maps and its pooled table (two keys); the next reads the table
    assert n > 0 and first.metrics["features_misses"] == 2 * n and first.metrics["features_hits"] == 0
    assert second.metrics["features_hits"] == n and second.metrics["features_misses"] == 0
    assert second.params["features_store"] == str(tmp_path / "features")
    out = capsys.readouterr().out
    assert f", pooled 2x2] {int(n)} images: {int(n)} hits, 0 misses" in out
    assert found[0]["cv_auc_mean"] == found[1]["cv_auc_mean"]


def test_a_killed_write_leaves_a_folder_the_next_open_removes(tmp_path):
    """SIGKILL while a part is written leaves its temporary folder (hundreds of MB for a real
    backbone); it carries the writer's host and pid, so the next open_store removes it, and
    leaves the folder of a writer still alive."""
    from conftest import run_until_killed

    run_until_killed(
        f"""
        import numpy as np
        from covidxray.training import feature_store as features
        saved = np.save
        def save_then_die(path, array):
            saved(path, array)
            die()
        features.np.save = save_then_die
        x = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
        features.FeatureStore({str(tmp_path)!r}).lookup({KEY!r}, x, lambda b: b.astype(np.float32))
        """,
        tmp_path,
    )
    entry = tmp_path / key_digest(KEY)
    assert len(list(entry.glob(".tmp-*"))) == 1 and not parts(tmp_path)
    alive = entry / f".tmp-{os.getpid()}-live"
    alive.mkdir()
    (alive / ".covidxray-scratch").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    open_store(tmp_path)
    assert [p.name for p in entry.glob(".tmp-*")] == [alive.name]
