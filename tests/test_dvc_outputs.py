"""What DVC users see of the outputs, with real `dvc` on a temporary git copy of the repository:
metrics committed to git (diffs work on a fresh clone), ROC/PR/calibration plots drawn without
smoothing, and the training history one line per fold."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import BIN, REPO
from covidxray.evaluation.loco import group_metrics
from covidxray.infra.outputs import figures_text
from test_pipeline import _sh, repo_copy  # noqa: F401 - the fixture, used by name

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _write_outputs(root: Path, cv_auc: float) -> None:
    """The files train and evaluate write (small, with the real plot writer)."""
    from covidxray.evaluation import figures
    from covidxray.training.trainer import HISTORY_COLUMNS

    cv, plots = root / "reports" / "cv", root / "reports" / "plots"
    for folder in (cv, plots, root / "models"):
        folder.mkdir(parents=True, exist_ok=True)
    from covidxray.evaluation.metrics import headline

    (cv / "metrics.json").write_text(json.dumps({"cv_auc_mean": cv_auc, "threshold": 0.5}))
    (cv / "headline.json").write_text(json.dumps(headline(1059, cv_auc, auc_sd=0.0123)))
    (root / "reports" / "metrics.json").write_text(json.dumps({"test": {"auc": 0.75}}))
    shown = dict(auc_low=0.7412, auc_high=0.7803, sensitivity=0.9942, specificity=0.0091)
    (root / "reports" / "headline.json").write_text(json.dumps(headline(133, 0.75, **shown)))
    (root / "reports" / "report.md").write_text("# card\n")
    (root / "models" / "model.keras").write_bytes(b"model")
    rows = [
        {"fold": fold, "epoch": epoch, "phase": "train", **{c: 0.5 + 0.01 * epoch for c in HISTORY_COLUMNS[2:-1]}}
        for fold in ("0", "1", "final")
        for epoch in (1, 2, 3)
    ]
    history = pd.DataFrame(rows)[HISTORY_COLUMNS]
    history.loc[history["fold"] == "final", ["val_loss", "val_accuracy", "val_auc"]] = np.nan
    history.to_csv(cv / "history.csv", index=False)
    (cv / "oof.csv").write_text("image_id,p_covid\na,0.5\n")
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    probs = np.clip(np.c_[1 - y * 0.6, y * 0.6] + rng.uniform(0, 0.4, (40, 1)), 0, 1)
    probs /= probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(40)]})
    plots.mkdir(parents=True, exist_ok=True)
    figures.write_plots(plots, frame, y, probs, (probs[:, 1] >= 0.5).astype(int), ["normal", "covid"], 5)
    loco = root / "reports" / "loco"
    (loco / "plots").mkdir(parents=True, exist_ok=True)
    roc = pd.DataFrame({"group": ["radiography"] * 3 + ["ieee8023+kermany"] * 3, "fpr": [0, 0.5, 1] * 2})
    roc.assign(tpr=[0, 0.8, 1, 0, 0.6, 1]).to_csv(loco / "plots" / "roc.csv", index=False)
    (loco / "metrics.json").write_text(json.dumps({"loco_auc_mean": 0.6, "loco_auc_worst": 0.5}))
    (loco / "headline.json").write_text(
        json.dumps(headline(2370, 0.6, auc_min=0.6487, spec_cal=0.3148))  # the loco stage's keys
    )
    study = root / "reports" / "study"  # the study stage's headline and forest table
    study.mkdir(parents=True, exist_ok=True)
    (study / "headline.json").write_text(
        json.dumps({"auc": 0.7401, "auc_min": 0.6639, "qualify": 1})  # the study stage's keys
    )
    pd.DataFrame(
        {
            "recipe": ["clahe", "clahe"],
            "group": ["radiography", "ieee8023+kermany"],
            "delta": [-0.028, -0.151],
            "low": [-0.04, -0.189],
            "high": [-0.017, -0.116],
            "counted": [True, False],
        }
    ).to_csv(study / "forest.csv", index=False)
    (loco / "groups").mkdir(exist_ok=True)
    figures = dict(auc=0.6639, auc_ci_low=0.5931, auc_ci_high=0.7383, shortcut_auc=0.9907, margin=-0.3267)
    figures |= dict(sensitivity=0.7304, specificity=0.2517, calibrated_specificity=0.1881)
    result = {
        "groups": {"ieee8023+kermany": {"n_images": 653, **figures}, "radiography": {"n_images": 2370, **figures}}
    }
    for stem, row in group_metrics(result).items():  # the loco stage's writer
        (loco / "groups" / f"{stem}.json").write_text(figures_text(row))


def wide(cwd: Path) -> dict:
    """subprocess.run arguments for a dvc table in a 200-column terminal: what it needs, unsqueezed."""
    return dict(cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def _dvc_json(args: list[str], cwd: Path):
    done = subprocess.run([str(BIN / "dvc"), *args, "--json"], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_metrics_are_committed_so_a_fresh_clone_diffs_them(repo_copy, tmp_path):  # noqa: F811
    _write_outputs(repo_copy, cv_auc=0.81)
    status = _sh(["git", "status", "--porcelain", "--untracked-files=all"], repo_copy).split("\n")
    # what git takes of the outputs written above (new, or changed where the checkout had them)
    taken = sorted(line[3:] for line in status if line[3:].startswith(("reports/", "models/")))
    assert taken == [
        "reports/cv/headline.json",
        "reports/cv/history.csv",
        "reports/cv/metrics.json",
        "reports/headline.json",
        "reports/loco/groups/ieee8023-kermany.json",
        "reports/loco/groups/radiography.json",
        "reports/loco/headline.json",
        "reports/loco/metrics.json",
        "reports/loco/plots/roc.csv",
        "reports/metrics.json",
        "reports/plots/calibration.csv",
        "reports/plots/confusion.csv",
        "reports/plots/precision_recall.csv",
        "reports/plots/roc.csv",
        "reports/study/forest.csv",
        "reports/study/headline.json",
    ]
    _sh([*GIT, "add", "-A"], repo_copy)
    _sh([*GIT, "commit", "-qm", "metrics"], repo_copy)

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    shown = _dvc_json(["metrics", "show"], clone)[""]["data"]  # "": the workspace
    assert sorted(shown) == [
        "reports/cv/headline.json",
        "reports/headline.json",
        "reports/loco/headline.json",
        "reports/study/headline.json",
    ]
    assert shown["reports/cv/headline.json"]["data"]["auc"] == 0.81
    assert shown["reports/headline.json"]["data"]["auc"] == 0.75
    assert shown["reports/loco/headline.json"]["data"]["auc"] == 0.6
    # one row per stage (the study's too), a few shared columns: the table fits a 120-column terminal
    table = subprocess.run([str(BIN / "dvc"), "metrics", "show"], **wide(clone)).stdout
    assert len(table.splitlines()) == 5 and max(map(len, table.splitlines())) <= 120, table
    header, study = table.splitlines()[0].split(), table.splitlines()[-1].split()
    assert study[0] == "reports/study/headline.json" and dict(zip(header, study))["qualify"] == "1", table
    # LOCO, one row per held-out group, within 120 columns (the README's recipe)
    groups = subprocess.run([str(BIN / "dvc"), "metrics", "show", "reports/loco/groups"], **wide(clone)).stdout
    rows = groups.splitlines()
    assert len(rows) == 3 and rows[1].startswith("reports/loco/groups/ieee8023-kermany.json"), groups
    assert max(map(len, rows)) <= 120 and rows[0].split()[1:] == sorted(rows[0].split()[1:]), groups
    assert {"base", "margin", "spec_cal", "auc_lo"} <= set(rows[0].split())
    # the README's `dvc exp show` recipe renders within 120 columns where the terminal is wider
    recipe = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show"))
    shown = subprocess.run([str(BIN / "dvc"), *shlex.split(recipe)[1:], "--no-pager"], **wide(clone))
    assert shown.returncode == 0 and "reports/loco/headline.json:auc" in shown.stdout, shown.stderr
    assert max(map(len, shown.stdout.splitlines())) <= 120 and "…" not in shown.stdout, shown.stdout
    (clone / "reports" / "cv" / "headline.json").write_text(json.dumps({"n": 1059, "auc": 0.85}))
    diff = _dvc_json(["metrics", "diff"], clone)
    change = diff["reports/cv/headline.json"]["auc"]
    assert (change["old"], change["new"]) == (0.81, 0.85)

    # plot tables are in git too: `dvc plots diff` reads the committed revision with no DVC cache
    roc = clone / "reports" / "plots" / "roc.csv"
    committed = pd.read_csv(roc)
    committed.assign(tpr=committed["tpr"] * 0.5).to_csv(roc, index=False)
    assert not (clone / ".dvc" / "cache").exists()
    plots = _dvc_json(["plots", "diff", "HEAD"], clone)
    assert not plots.get("errors"), plots.get("errors")
    assert len(plots["data"]) == 7  # every plot of dvc.yaml
    values = plots["data"]["reports/plots/roc.csv"][0]["content"]["data"]["values"]
    by_rev = {rev: [float(p["tpr"]) for p in values if p["rev"] == rev] for rev in ("HEAD", "workspace")}
    assert by_rev["HEAD"] == committed["tpr"].tolist()
    assert by_rev["workspace"] == (committed["tpr"] * 0.5).tolist()


def test_plots_are_drawn_unsmoothed_and_history_by_fold(repo_copy):  # noqa: F811
    _write_outputs(repo_copy, cv_auc=0.8)
    shown = _dvc_json(["plots", "show"], repo_copy)
    assert not shown.get("errors"), shown.get("errors")
    specs = {name: plot[0]["content"] for name, plot in shown["data"].items()}
    for name in ("roc", "precision_recall", "calibration"):
        spec = json.dumps(specs[f"reports/plots/{name}.csv"])
        assert '"loess"' not in spec and '"mark": {"type": "line"' in spec  # the points as they are
    roc = specs["reports/plots/roc.csv"]
    written = pd.read_csv(repo_copy / "reports" / "plots" / "roc.csv")
    assert [float(p["tpr"]) for p in roc["data"]["values"]] == written["tpr"].tolist()

    history = specs["reports/cv/history.csv"]
    assert history["encoding"]["color"]["field"] == "fold"
    assert (history["encoding"]["x"]["field"], history["encoding"]["y"]["field"]) == ("epoch", "val_auc")
    assert {p["fold"] for p in history["data"]["values"]} == {"0", "1", "final"}
    assert "isValid(datum['val_auc'])" in history["transform"][0]["filter"]  # the final model: no val curve
    assert history["encoding"]["shape"]["field"] == "rev"  # revisions: a marker each (and a dash pattern)

    calibration = specs["reports/plots/calibration.csv"]  # the diagonal, points sized and labelled by count
    diagonal, *_, labels = calibration["layer"]
    assert [(v["diagonal_x"], v["diagonal_y"]) for v in diagonal["data"]["values"]] == [(0, 0), (1, 1)]
    assert labels["mark"]["type"] == "text" and labels["encoding"]["text"]["field"] == "count"
    assert any(layer["encoding"].get("size", {}).get("field") == "count" for layer in calibration["layer"])
    # the confusion matrix as report.md draws it: rows actual, columns predicted
    confusion = specs["reports/plots/confusion.csv"]["spec"]["encoding"]
    assert (confusion["y"]["field"], confusion["x"]["field"]) == ("actual", "predicted")

    forest = specs["reports/study/forest.csv"]  # per recipe | group: a point, its interval, the zero line
    assert forest["encoding"]["y"]["field"] == "row" and [layer["mark"]["type"] for layer in forest["layer"]] == [
        "rule",
        "point",
        "rule",
    ]
    assert {p["group"] for p in forest["data"]["values"]} == {"radiography", "ieee8023+kermany"}

    loco = specs["reports/loco/plots/roc.csv"]  # one ROC curve per held-out group
    assert loco["encoding"]["color"]["field"] == "group"
    assert {p["group"] for p in loco["data"]["values"]} == {"radiography", "ieee8023+kermany"}
