"""`covidxray predict` on files as found in the wild, and `covidxray validate` on external sets,
with the smoke model trained by the real train stage (see test_evaluate.trained_model)."""

from __future__ import annotations

import io
import json
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxray import CovidXrayError
from test_evaluate import trained_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


@pytest.fixture(scope="module")
def test_images(tiny) -> tuple[np.ndarray, pd.DataFrame]:
    from covidxray.data import images
    from covidxray.stages import evaluate

    pixels, index, _ = images.load_curated(tiny["curated"])
    return evaluate.test_partition(pixels, index, images.load_splits(tiny["splits"]), tiny["meta"]["sources"])


def run_cli(func, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = func([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def wild_files(gray: np.ndarray, folder: Path) -> dict[str, Path]:
    """One X-ray written as an 8-bit grayscale PNG (model size), an RGB JPEG and an RGBA PNG
    (other sizes), and a 16-bit PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "gray": folder / "gray.png",
        "rgb": folder / "rgb.jpg",
        "rgba": folder / "rgba.png",
        "sixteen": folder / "sixteen.png",
    }
    Image.fromarray(gray).save(files["gray"])
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1)).resize((96, 80), Image.Resampling.BILINEAR)
    rgb.save(files["rgb"], quality=95)
    rgba = np.dstack([np.stack([gray] * 3, axis=-1), np.full(gray.shape, 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").resize((50, 50)).save(files["rgba"])
    Image.fromarray(gray.astype(np.uint16) * 16 + 100).save(files["sixteen"])  # 12 bits used
    assert Image.open(files["sixteen"]).mode.startswith("I")
    return files


def test_predict_wild_files_and_errors(tiny, test_images, tmp_path):
    from covidxray.networks.inference import probabilities
    from covidxray.networks.model_file import load_model
    from covidxray.tools.predict import predict_cli

    pixels, frame = test_images
    files = wild_files(pixels[0], tmp_path / "in")
    (tmp_path / "in" / "notes.png").write_text("not an image at all")
    missing = tmp_path / "in" / "missing.jpg"
    argv = [
        *files.values(),
        tmp_path / "in" / "notes.png",
        missing,
        "--model",
        tiny["models"],
        "--csv",
        "--gradcam",
        tmp_path / "cams",
    ]
    code, out, err = run_cli(predict_cli, argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "missing.jpg" in lines[0] and "notes.png" in lines[1]  # missing ones: before loading
    assert all(line.startswith("covidxray predict: error:") for line in lines)
    table = pd.read_csv(io.StringIO(out))
    assert table["path"].tolist() == [str(p) for p in files.values()]
    assert table["p_covid"].between(0, 1).all()
    # a resampled or re-scaled copy of a tiny noisy training image may be unlike them: flagged (test_ood.py)
    threshold, flagged = tiny["meta"]["threshold"], table["ood"].to_numpy(dtype=bool)
    called = np.where(table["p_covid"] >= threshold, "covid", "normal")
    assert (table["label"] == np.where(flagged, "out-of-distribution", called)).all()
    # the same preprocessing as training: a model-sized grayscale PNG gives the curated prediction
    model, meta = load_model(tiny["models"])
    expected = probabilities(model, pixels[:1], 2)[0, 1]
    assert table.loc[0, "p_covid"] == pytest.approx(expected, abs=1e-4)
    assert table["gradcam"].tolist() == [str(tmp_path / "cams" / f"{n}_gradcam.png") for n in files]
    for name in ("gray", "rgb", "rgba", "sixteen"):
        with Image.open(tmp_path / "cams" / f"{name}_gradcam.png") as cam:
            picture = np.asarray(cam.convert("RGB")).astype(int)
        # a figure (title with the score, overlay, colour bar), not the bare 32 px overlay; the bar
        # holds jet's pure ends, which the overlay (blended with the X-ray) never reaches
        height, width, _ = picture.shape
        assert width > 200 and height > 200
        bar = picture[:, int(width * 0.75) :]
        r, g, b = bar[..., 0], bar[..., 1], bar[..., 2]
        assert ((r > 120) & (g < 10) & (b < 10)).any() and ((b > 120) & (r < 10) & (g < 10)).any()


def test_predict_json_and_success_code(tiny, test_images, tmp_path):
    from covidxray.tools.predict import predict_cli

    files = wild_files(test_images[0][1], tmp_path)
    code, out, err = run_cli(
        predict_cli, [files["gray"], files["rgb"], "--model", tiny["models"] / "model.keras", "--json"]
    )
    assert code == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [str(files["gray"]), str(files["rgb"])]
    assert all(0 <= r["p_covid"] <= 1 and r["label"] in ("normal", "covid", "out-of-distribution") for r in rows)
    assert all((r["label"] == "out-of-distribution") == r["ood"] for r in rows)
    code, out, _ = run_cli(predict_cli, [files["gray"], "--model", tiny["models"]])
    assert code == 0 and "p_covid" in out and "threshold" in out  # aligned table


def test_predict_refuses_images_too_small_or_flat_for_an_xray(tiny, test_images, tmp_path):
    from covidxray.tools.predict import predict_cli

    files = wild_files(test_images[0][0], tmp_path)
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(tmp_path / "dot.png")
    Image.fromarray(np.full((300, 300), 255, np.uint8)).save(tmp_path / "white.png")
    code, out, err = run_cli(
        predict_cli, [files["gray"], tmp_path / "dot.png", tmp_path / "white.png", "--model", tiny["models"], "--csv"]
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "dot.png" in lines[0] and "too small" in lines[0] and "at least 32 px" in lines[0]
    assert "white.png" in lines[1] and "too flat" in lines[1]
    assert pd.read_csv(io.StringIO(out))["path"].tolist() == [str(files["gray"])]


def test_predict_from_registered_model(tiny, test_images, tmp_path, monkeypatch):
    """models:/NAME/VERSION: the model train registered, with its metadata (threshold, size)."""
    from covidxray.tools.predict import predict_cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    files = wild_files(test_images[0][2], tmp_path)
    local = run_cli(predict_cli, [files["gray"], files["rgba"], "--model", tiny["models"], "--csv"])
    uri = tiny["meta"]["model_uri"]
    assert uri.startswith("models:/")
    scratch = tmp_path / "tmpdir"  # where tempfile puts its folders during this call
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    remote = run_cli(
        predict_cli, [files["gray"], files["rgba"], "--model", uri, "--csv", "--tracking-uri", tiny["tracking_uri"]]
    )
    assert remote[0] == 0
    assert "Downloading artifacts" not in remote[2] and "%|" not in remote[2], remote[2]  # no progress bars
    assert list(scratch.iterdir()) == []  # the downloaded copy of the model is gone
    a, b = pd.read_csv(io.StringIO(local[1])), pd.read_csv(io.StringIO(remote[1]))
    assert np.allclose(a["p_covid"], b["p_covid"], atol=1e-4)
    assert a["label"].tolist() == b["label"].tolist()


def test_predict_unknown_registered_model(tiny, tmp_path):
    from covidxray.tools.predict import predict_cli

    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "x.png")  # present: the model is looked up
    with pytest.raises(CovidXrayError, match="cannot load MLflow model"):
        predict_cli(
            [str(tmp_path / "x.png"), "--model", "models:/no-such-model/7", "--tracking-uri", tiny["tracking_uri"]]
        )


# -- validate -------------------------------------------------------------------------------------


def _write_folder(pixels, frame, root: Path) -> Path:
    for i, (img, row) in enumerate(zip(pixels, frame.itertuples())):
        folder = root / row.label
        folder.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:  # some RGB JPEGs at another size, as external sets come
            Image.fromarray(np.stack([img] * 3, -1)).resize((64, 64)).save(folder / f"{row.image_id}.jpg")
        else:
            Image.fromarray(img).save(folder / f"{row.image_id}.png")
    return root


def test_validate_folder(tiny, test_images, tmp_path):
    import mlflow

    from covidxray.infra import tracking
    from covidxray.tools.validate import validate_cli

    pixels, frame = test_images
    folder = _write_folder(pixels, frame, tmp_path / "hospital_b")
    out = tmp_path / "report"
    code, stdout, _ = run_cli(
        validate_cli,
        [folder, "--model", tiny["models"], "--out", out, "--tracking-uri", tiny["tracking_uri"], "--bootstrap", 100],
    )
    assert code == 0, stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_external_images"] == len(frame)
    assert metrics["n_external_patients"] == len(frame)  # no patient ids: one per image
    assert metrics["threshold"] == pytest.approx(tiny["meta"]["threshold"], rel=1e-3)  # files: 4 significant digits
    for key in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "brier", "ece"):
        assert key in metrics["external"]
    for name in ("roc", "precision_recall", "calibration", "confusion", "gradcam"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert {"roc.csv", "precision_recall.csv", "calibration.csv", "confusion.csv"} <= {
        p.name for p in (out / "plots").iterdir()
    }
    report = (out / "report.md").read_text()
    assert "External validation: report" in report and "not a diagnostic device" in report
    assert not list(tmp_path.glob(".report*"))

    tracking.configure(tiny["tracking_uri"], "covid-xray")
    runs = mlflow.search_runs(experiment_names=["covid-xray"], filter_string="tags.model_run_id != ''")
    run = runs[runs["tags.mlflow.runName"] == "validate-report"].iloc[0]
    assert run["tags.model_run_id"] == tiny["run_id"]
    assert run["run_id"] != tiny["run_id"]
    assert "tags.mlflow.parentRunId" not in runs.columns or pd.isna(run.get("tags.mlflow.parentRunId"))
    assert run["metrics.external_auc"] == pytest.approx(
        metrics["external"]["auc"], rel=1e-3
    )  # files: 4 significant digits


def test_validate_never_replaces_a_folder_it_did_not_write(tiny, test_images, tmp_path, capsys):
    """`--out reports` must not delete the pipeline's reports (cv/, evaluate's outputs)."""
    from covidxray import cli

    pixels, frame = test_images
    folder = _write_folder(pixels, frame, tmp_path / "hospital_c")
    reports = tmp_path / "reports"
    (reports / "cv").mkdir(parents=True)
    for name, text in {"cv/metrics.json": '{"cv_auc_mean": 0.9}', "metrics.json": "{}", "report.md": "# card"}.items():
        (reports / name).write_text(text)
    before = sorted(p.relative_to(reports).as_posix() for p in reports.rglob("*"))

    def validate_into(out) -> int:
        argv = ["validate", str(folder), "--model", str(tiny["models"]), "--out", str(out)]
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--tracking-uri", tiny["tracking_uri"], "--bootstrap", "20"])
        return exit_info.value.code

    assert validate_into(reports) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refusing to replace {reports}" in err
    assert sorted(p.relative_to(reports).as_posix() for p in reports.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital_c", "reports"]
    # a folder of its own below it is fine, and so is replacing that one later
    for _ in range(2):
        assert validate_into(reports / "validation" / "c") == 0
    assert (reports / "validation" / "c" / "report.md").is_file() and (reports / "cv" / "metrics.json").is_file()


def test_validate_csv_with_patients(tiny, test_images, tmp_path):
    from covidxray.evaluation.assess import AssessOptions
    from covidxray.tools.validate import validate

    pixels, frame = test_images
    (tmp_path / "set" / "img").mkdir(parents=True)
    rows = []
    for img, row in zip(pixels, frame.itertuples()):
        Image.fromarray(img).save(tmp_path / "set" / "img" / f"{row.image_id}.png")
        rows.append({"path": f"img/{row.image_id}.png", "label": row.label, "patient_id": row.patient_id})
    pd.DataFrame(rows).to_csv(tmp_path / "set" / "labels.csv", index=False)
    out = tmp_path / "reports" / "external" / "labels"
    options = AssessOptions(n_resamples=50, ci=0.95, seed=0, per_group=3, n_bins=10)
    result = validate(tmp_path / "set" / "labels.csv", str(tiny["models"]), out, options, log=False)
    assert result["n_external_images"] == len(frame)
    assert result["n_external_patients"] == frame["patient_id"].nunique() < len(frame)
    assert (out / "report.md").is_file() and (out / "figures" / "gradcam.png").is_file()
    # a second run replaces the folder whole
    (out / "stale.txt").write_text("old")
    validate(tmp_path / "set" / "labels.csv", str(tiny["models"]), out, options, log=False)
    assert not (out / "stale.txt").exists()


def test_validate_unknown_label_lists_known_ones(tiny, test_images, tmp_path, capsys):
    from covidxray import cli

    pixels, _ = test_images
    (tmp_path / "ext" / "pneumonia").mkdir(parents=True)
    (tmp_path / "ext" / "normal").mkdir()
    Image.fromarray(pixels[0]).save(tmp_path / "ext" / "pneumonia" / "a.png")
    Image.fromarray(pixels[1]).save(tmp_path / "ext" / "normal" / "b.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "validate",
                str(tmp_path / "ext"),
                "--model",
                str(tiny["models"]),
                "--out",
                str(tmp_path / "out"),
                "--tracking-uri",
                tiny["tracking_uri"],
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "pneumonia" in err and "known: normal, covid" in err
    assert not (tmp_path / "out").exists()


def test_validate_bad_csv(tmp_path):
    from covidxray.tools.validate import read_external

    (tmp_path / "a.csv").write_text("file,label\nx.png,covid\n")
    with pytest.raises(CovidXrayError, match="path and label"):
        read_external(tmp_path / "a.csv")
    with pytest.raises(CovidXrayError, match="not found"):
        read_external(tmp_path / "nothing")
