"""Collections as configuration: a collection added with one YAML file (a folder per class, or a
CSV) is curated by the real stage, deduplicated against the others, trained on and held out at
smoke size; every bad input stops before decoding with one line naming collection, file and key;
the shipped definitions select what the code selected before (counts from ../shared)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import BIN, REPO, make_cfg, synthetic_xrays
from covidxray import CovidXrayError
from covidxray.data import collections as C
from covidxray.data.listing import list_collections
from covidxray.stages import curate
from test_pipeline import repo_copy  # noqa: F401 - the fixture, used by name

SIZE = 32
FOLDER_YAML = """\
# @package data.collections.hospital_a
name: hospital_a
kind: folder
path: hospital_a
labels: {covid: covid, normal: normal}
patient:
  pattern: ['^([a-z]\\d+)-']
age_group: adults
citation: Hospital A, 2026
license: CC BY 4.0
"""
CSV_YAML = """\
# @package data.collections.hospital_b
name: hospital_b
kind: csv
path: hospital_b/labels.csv
labels: {COVID-19: covid, NORMAL: normal}
citation: Hospital B, 2026
license: research use
"""


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_hospitals(external: Path, seed: int = 0) -> dict:
    """hospital_a: a folder per class (12 + 12 images, 2 per patient); hospital_b: a CSV of
    path,label,patient_id (8 + 8 patients), one of whose normals is hospital_a's covid image (a cross-class
    copy) and another a near-duplicate of a hospital_a normal (a cross-collection near-duplicate)."""
    rng = np.random.default_rng(seed)
    a = {label: synthetic_xrays(12, 48, label == "covid", rng) for label in ("covid", "normal")}
    for label, images in a.items():
        for k, img in enumerate(images):
            _save(external / "hospital_a" / label / f"{label[0]}{k // 2:02d}-{k}.png", img)
    b = {label: synthetic_xrays(8, 48, label == "COVID-19", rng) for label in ("COVID-19", "NORMAL")}
    b["NORMAL"][0] = a["covid"][0]  # the same image under two classes: dropped everywhere
    b["NORMAL"][1] = np.clip(a["normal"][3].astype(int) + 3, 0, 255).astype(np.uint8)  # near-duplicate
    rows = []
    for label, images in b.items():
        for k, img in enumerate(images):
            rel = f"img/{label.lower()}/{k}.png"  # names repeat across folders: ids use the path
            _save(external / "hospital_b" / rel, img)
            rows.append({"path": rel, "label": label, "patient_id": f"{label[0]}{k}"})
    pd.DataFrame(rows).to_csv(external / "hospital_b" / "labels.csv", index=False)
    return {"a": 24, "b": 16}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of conf/ with two added collection files, as a user adds them, as the working dir."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "collection" / "hospital_a.yaml").write_text(FOLDER_YAML)
    (tmp_path / "conf" / "collection" / "hospital_b.yaml").write_text(CSV_YAML)
    write_hospitals(tmp_path / "data" / "external")
    monkeypatch.chdir(tmp_path)
    return tmp_path


ROLES = [
    "data.sources={train: {covid: [hospital_a], normal: [hospital_a]}, external: {covid: [hospital_b], "
    "normal: [hospital_b]}}"
]


def test_added_collections_are_curated_trained_on_and_held_out(project):
    """The README's example end to end: two collections added without touching src/."""
    from covidxray.stages import loco, split, train

    cfg = make_cfg(
        [
            "collection=[hospital_a,hospital_b]",
            "experiment=smoke",
            f"data.store_size={SIZE}",
            "evaluate.bootstrap=50",
            f"mlflow.tracking_uri=sqlite:///{project / 'mlruns' / 'mlflow.db'}",
            *ROLES,
        ]
    )
    assert list(cfg.data.collections) == ["hospital_a", "hospital_b"]
    curate.main(cfg)
    curated = project / "data" / "curated"
    index = pd.read_csv(curated / "index.csv")
    assert index.groupby("source").size().to_dict() == {"hospital_a": 23, "hospital_b": 15}  # the copy, dropped
    audit = json.loads((curated / "audit.json").read_text())
    assert audit["dedupe"]["cross_class_images_dropped"] == 2
    near = index[index["dup_group"].duplicated(keep=False)]
    assert set(near["source"]) == {"hospital_a", "hospital_b"}  # tied across collections
    assert index.loc[index["source"] == "hospital_a", "patient_id"].str.match(r"hospital_a-[cn]\d\d$").all()
    assert index["image_id"].is_unique and (index["image_id"].str.startswith("hospital_b-img_")).sum() == 15
    facts = json.loads((curated / "collections.json").read_text())
    assert facts["hospital_b"]["images"] == 15 and facts["hospital_b"]["classes"] == {"covid": 8, "normal": 7}
    assert facts["hospital_a"]["patients"] == 12 and facts["hospital_a"]["license"] == "CC BY 4.0"
    assert set(facts["hospital_a"]["shortcut_auc_vs_rest"]) == {"geometry_format", "pixel_stats"}
    assert "| hospital_b | 15 |" in (curated / "audit.md").read_text()

    split.main(cfg)
    train.main(cfg)
    loco.main(cfg)  # the internal test report (evaluate) is optional to it
    oof = pd.read_csv(project / "reports" / "cv" / "oof.csv")
    assert oof["image_id"].str.startswith("hospital_a-").all()
    details = json.loads((project / "reports" / "loco" / "details.json").read_text())
    assert list(details["groups"]) == ["hospital_b"]  # held out by leave-one-collection-out, trained on hospital_a
    held = details["groups"]["hospital_b"]
    assert set(held["per_collection"]) == {"covid/hospital_b", "normal/hospital_b"}
    # every hospital_b image, less a near-duplicate of an image it was trained on (the cv partition)
    assert held["n_images"] + held["dropped_shared_with_training"] == 15
    roles = pd.read_csv(project / "reports" / "loco" / "predictions.csv")
    trained, measured = roles[roles.role == "train"], roles[roles.role == "held_out"]
    assert len(measured) == held["n_images"] and not set(trained.dup_group) & set(measured.dup_group)
    card = (project / "reports" / "model_card.md").read_text()
    assert "| hospital_b | 15 | Hospital B, 2026 | research use |" in card  # citation and license


def test_exact_copies_are_removed_from_the_collection_listed_later(project):
    """hospital_b repeats three of hospital_a's covid images; listed first, it keeps them and
    hospital_a loses its copies (whatever the names sort as); audit.json and audit.md say so."""
    external = project / "data" / "external"
    rows = pd.read_csv(external / "hospital_b" / "labels.csv")
    added = []
    for k, original in enumerate(sorted((external / "hospital_a" / "covid").glob("*.png"))[1:4]):  # [0]: cross-class
        (external / "hospital_b" / "copies").mkdir(exist_ok=True)
        shutil.copyfile(original, external / "hospital_b" / "copies" / f"{k}.png")
        added.append({"path": f"copies/{k}.png", "label": "COVID-19", "patient_id": f"X{k}"})
    pd.concat([rows, pd.DataFrame(added)]).to_csv(external / "hospital_b" / "labels.csv", index=False)
    curate.main(make_cfg(["collection=[hospital_b,hospital_a]", f"data.store_size={SIZE}", *ROLES]))
    curated = project / "data" / "curated"
    index = pd.read_csv(curated / "index.csv")
    assert index.groupby("source").size().to_dict() == {"hospital_a": 20, "hospital_b": 18}
    assert index["image_id"].str.startswith("hospital_b-copies_").sum() == 3
    dedupe = json.loads((curated / "audit.json").read_text())["dedupe"]
    assert dedupe["exact_duplicates_removed_from"] == {"hospital_a": 3}
    assert "exact duplicates removed: 3 (3 groups); removed from hospital_a 3" in (curated / "audit.md").read_text()


def readme_collection_yaml() -> str:
    """The YAML block after the collection-example marker of README.md, as a user copies it."""
    text = (REPO / "README.md").read_text()
    assert "<!-- collection-example" in text, "README.md lost its collection example"
    return text.split("<!-- collection-example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_collection_works_when_pasted(tmp_path, monkeypatch):
    """README's "Adding a collection" YAML, pasted as conf/collection/hospital_a.yaml: it composes
    under data.collections.hospital_a (its `# @package` line first), its labels and patient
    patterns read a folder of COVID/NORMAL/OTHER images named two ways, and curate curates it."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "collection" / "hospital_a.yaml").write_text(readme_collection_yaml())
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    names = {
        "COVID": ["P001_1.png", "P001_2.png", "P002_1.png", "P003_1.png", "scan7.png", "scan8.png"],
        "NORMAL": ["P004_1.png", "P004_2.png", "P005_1.png", "P006_1.png", "scan9.png", "P007_1.png"],
        "OTHER": ["P009_1.png"],
    }
    for label, files in names.items():
        for name, pixels in zip(files, synthetic_xrays(len(files), 48, label == "COVID", rng)):
            _save(tmp_path / "data" / "external" / "hospital_a" / label / name, pixels)
    cfg = make_cfg(
        [
            "collection=[ieee8023,kermany,radiography,hospital_a]",
            "data.sources={train: {covid: [hospital_a], normal: [hospital_a]}}",
            f"data.store_size={SIZE}",
        ]
    )
    assert "collection" not in cfg and list(cfg.data.collections)[-1] == "hospital_a"
    assert cfg.data.collections.hospital_a.citation == "Hospital A chest X-rays, 2026"
    roles = "data.sources={train: {covid: [hospital_a], normal: [hospital_a]}}"
    curate.main(make_cfg(["collection=[hospital_a]", roles, f"data.store_size={SIZE}"]))  # no pinned data here
    index = pd.read_csv(tmp_path / "data" / "curated" / "index.csv")
    assert index.groupby("label").size().to_dict() == {"covid": 6, "normal": 6}  # OTHER: null, left out
    patients = dict(zip(index["image_id"], index["patient_id"]))
    assert patients["hospital_a-P001_1"] == patients["hospital_a-P001_2"] == "hospital_a-P001"
    assert patients["hospital_a-scan7"] == "hospital_a-scan7"  # no _: one patient per image


def test_dvc_repro_stops_when_conf_changed_without_make_params(repo_copy):  # noqa: F811
    """The README's order: edit conf/, `make params`, `dvc repro`. Skipping `make params`, a stage
    run by `dvc repro` stops with one line naming the stale key (instead of re-running on the old
    params.yaml and exiting 0); after `make params`, DVC sees the edit as a changed param."""
    dvc = str(BIN / "dvc")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    kermany = repo_copy / "conf" / "collection" / "kermany.yaml"
    kermany.write_text(kermany.read_text().replace("age_group: children (1-5 years)", "age_group: children"))
    # pretrained: a stage that needs no pulled data (every stage reads params.yaml through the same check)
    stale = subprocess.run([dvc, "repro", "pretrained"], cwd=repo_copy, env=env, capture_output=True, text=True)
    assert stale.returncode != 0
    errors = [line for line in (stale.stdout + stale.stderr).splitlines() if line.startswith("covidxray ")]
    assert errors == [
        "covidxray pretrained: error: params.yaml is stale: run make params "
        "(conf/ composes data.collections.kermany.age_group differently)"
    ], stale.stdout + stale.stderr
    assert not (repo_copy / "models" / "pretrained").exists()  # stopped before writing anything
    make = ["make", "-s", "-o", ".venv/.installed", "params", f"BIN={BIN}"]
    subprocess.run(make, cwd=repo_copy, env=env, check=True, capture_output=True)
    changed = json.loads(
        subprocess.run(
            [dvc, "params", "diff", "--json"], cwd=repo_copy, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert changed["params.yaml"]["data.collections.kermany.age_group"]["new"] == "children"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_accepts_an_added_collection(project, preset):
    from covidxray.settings.train import train_settings

    cfg = make_cfg(
        [f"experiment={preset}", "collection=[ieee8023,kermany,radiography,hospital_a]", "model.weights=none"]
    )
    cfg.data.sources.train.covid = [*cfg.data.sources.train.covid, "hospital_a"]
    assert "hospital_a" in train_settings(cfg).roles["train"]["covid"]


def test_provides_is_plain_data_for_every_collection():
    cfg = make_cfg([])
    assert C.provides(cfg.data.collections) == {
        "ieee8023": ("pneumonia", "covid"),
        "kermany": ("normal", "pneumonia"),
        "radiography": ("normal", "covid"),
    }
    assert C.provides(cfg.data.collections, "binary")["kermany"] == ("normal",)
    C.check_definition_files(REPO / "conf" / "collection")
    every = sorted(p.stem for p in (REPO / "conf" / "collection").glob("*.yaml"))
    assert C.chosen_names(REPO / "conf", [f"collection=[{','.join(every)}]"]) == every
    assert len(C.parse_collections(make_cfg([f"collection=[{','.join(every)}]"]).data.collections)) == len(every)


# ---------- bad input: one line naming collection, file and key; nothing written ----------


def _cfg(root: Path, definitions: dict):
    cfg = OmegaConf.load(REPO / "params.yaml")
    cfg.paths.raw, cfg.paths.external = str(root / "raw"), str(root / "external")
    cfg.paths.curated = str(root / "out" / "curated")
    cfg.data.store_size = SIZE
    cfg.data.collections = definitions
    return cfg


def _definitions(**changes) -> dict:
    a, b = (OmegaConf.to_container(OmegaConf.create(y)) for y in (FOLDER_YAML, CSV_YAML))
    for key, value in changes.items():
        which, field = key.split("__")
        ({"a": a, "b": b}[which]).update({field: value})
    return {"hospital_a": a, "hospital_b": b}


def _fails(root: Path, definitions: dict, message: str) -> None:
    with pytest.raises(CovidXrayError, match=message) as err:
        curate.main(_cfg(root, definitions))
    assert "\n" not in str(err.value)
    assert not (root / "out").exists()


@pytest.fixture
def inputs(tmp_path):
    write_hospitals(tmp_path / "external")
    return tmp_path


def test_a_label_that_maps_to_no_class(inputs):
    (inputs / "external" / "hospital_a" / "Covid").mkdir()
    _fails(
        inputs,
        _definitions(),
        r"^collection hospital_a: .*hospital_a: label 'Covid' maps to no class .* "
        r"\(key data.collections.hospital_a.labels\)$",
    )
    (inputs / "external" / "hospital_a" / "Covid").rmdir()
    pd.DataFrame({"path": ["img/covid-19/0.png"], "label": ["covid"]}).to_csv(
        inputs / "external" / "hospital_b" / "labels.csv", index=False
    )
    _fails(inputs, _definitions(), r"collection hospital_b: .*labels.csv: label 'covid' maps to no class")


def test_a_class_the_task_lacks(inputs):
    _fails(
        inputs,
        _definitions(a__labels={"covid": "covid", "normal": "tuberculosis"}),
        r"^collection hospital_a \(conf/collection/hospital_a.yaml\): data.collections.hospital_a.labels.normal: "
        r"maps to 'tuberculosis', not a class \(allowed: normal, "
        r"pneumonia, covid, or null",
    )
    _fails(
        inputs,
        _definitions(a__labels={"covid": "pneumonia", "normal": "pneumonia"}),
        r"^collection hospital_a \(conf/collection/hospital_a.yaml\): data.collections.hospital_a.labels: "
        r"provides pneumonia, no class of task binary",
    )


def test_a_class_no_chosen_collection_provides(inputs):
    only_a = {"hospital_a": _definitions(a__labels={"covid": None, "normal": "normal"})["hospital_a"]}
    _fails(inputs, only_a, r"^data.collections: no collection provides covid \(task binary; chosen: hospital_a\)$")


def test_a_duplicate_collection_name(inputs, tmp_path):
    _fails(
        inputs,
        _definitions(b__name="hospital_a"),
        r"^collection hospital_b \(conf/collection/hospital_b.yaml\): data.collections.hospital_b.name: is ",
    )
    folder = tmp_path / "conf_collection"
    folder.mkdir()
    (folder / "hospital_a.yaml").write_text(FOLDER_YAML)
    (folder / "copy_of_a.yaml").write_text(FOLDER_YAML)
    with pytest.raises(CovidXrayError, match=r"duplicate collection: .*copy_of_a.yaml and .*hospital_a.yaml"):
        C.check_definition_files(folder)


def test_a_csv_with_missing_columns_or_paths_outside_its_folder(inputs):
    labels = inputs / "external" / "hospital_b" / "labels.csv"
    table = pd.read_csv(labels)
    table[["path", "patient_id"]].to_csv(labels, index=False)
    _fails(
        inputs,
        _definitions(),
        r"^collection hospital_b: .*hospital_b/labels.csv lacks column\(s\) label for label "
        r"\(key data.collections.hospital_b.columns.label\)$",
    )
    table.loc[3, "path"] = "../hospital_a/covid/c00-0.png"
    table.to_csv(labels, index=False)
    _fails(inputs, _definitions(), r"labels.csv row 5: path '../hospital_a/covid/c00-0.png' is outside")
    table.loc[3, "path"] = "img/nothere.png"
    table.to_csv(labels, index=False)
    _fails(inputs, _definitions(), r"labels.csv row 5: image missing: .*nothere.png \(key data.collections.hospital_b")


def test_a_missing_file_or_folder_and_a_folder_without_images(inputs, tmp_path):
    _fails(
        inputs,
        _definitions(b__path="hospital_b/nothere.csv"),
        r"^collection hospital_b: file missing: .*nothere.csv \(key data.collections.hospital_b.path\)$",
    )
    _fails(inputs, _definitions(a__path="nothere"), r"^collection hospital_a: folder missing: .*nothere")
    for png in (inputs / "external" / "hospital_a").rglob("*.png"):
        png.unlink()
    _fails(inputs, _definitions(), r"^collection hospital_a: no images in .*hospital_a \(expected")
    done = subprocess.run(
        [str(BIN / "covidxray"), "curate", "collection=[kermany,nothere]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "collection nothere: definition file missing: " in done.stderr and "nothere.yaml" in done.stderr


# ---------- the shipped definitions select what main's code selected ----------

# Per (collection, class) records listed, patients per collection and probe rows, before decoding,
# as listed by the code of main before collections moved to conf/ (commit e33180e), on ../shared.
SHIPPED = {
    "binary": (
        {("ieee8023", "covid"): 217, ("kermany", "normal"): 450, ("radiography", "covid"): 1200,
         ("radiography", "normal"): 1200},
        {"ieee8023": 146, "kermany": 389, "radiography": 2400},
        85,
    ),
    "three_class": (
        {("ieee8023", "covid"): 217, ("ieee8023", "pneumonia"): 65, ("kermany", "normal"): 450,
         ("kermany", "pneumonia"): 200, ("radiography", "covid"): 1200, ("radiography", "normal"): 1200},
        {"ieee8023": 185, "kermany": 556, "radiography": 2400},
        20,
    ),
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_definitions_select_what_the_code_did(task, collection_dir, external_dir):
    """Runs wherever the other tests on ../shared run (the fixtures pull data/external), so CI checks
    that the shipped definitions reproduce today's counts."""
    cfg = make_cfg([f"data.task={task}"])
    records, probe = list_collections(
        C.parse_collections(cfg.data.collections, task), collection_dir, external_dir, task
    )
    per_class, patients, probes = SHIPPED[task]
    assert records.groupby(["source", "label"]).size().to_dict() == per_class
    assert records.groupby("source")["patient_id"].nunique().to_dict() == patients
    assert len(probe) == probes


def test_a_csv_collection_filters_by_view_and_age_and_reads_patients(inputs):
    labels = inputs / "external" / "hospital_b" / "labels.csv"
    table = pd.read_csv(labels)
    table["view"] = ["PA", "AP"] * 8
    table["age"] = [12, 40, 70, None] * 4
    table.loc[2, "patient_id"] = ""  # blank: the image (img/covid-19/2.png) is its own patient
    table.to_csv(labels, index=False)
    definitions = _definitions(b__filters={"views": ["PA"], "min_age": 18})
    c = C.parse_collections(definitions, "binary")[1]
    records, probe = list_collections([c], inputs / "raw", inputs / "external", "binary")
    assert len(records) == 4 and set(records["view"]) == {"PA"} and probe.empty  # PA rows of 70, not of 12
    assert (records["age"] == 70).all()
    assert sorted(records["patient_id"]) == ["hospital_b-2", "hospital_b-C6", "hospital_b-N2", "hospital_b-N6"]
    assert records["finding"].isin(["COVID-19", "No Finding"]).all()


def test_symbolic_links_out_of_a_collections_folder_are_refused(inputs, tmp_path):
    """A link in a folder collection (to a file, or to a folder of images) or a CSV row naming a
    link that leads outside the collection's folder: one line, as a path outside is."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.png"
    shutil.copy(next((inputs / "external" / "hospital_a" / "covid").glob("*.png")), secret)
    link = inputs / "external" / "hospital_a" / "covid" / "c99-0.png"
    link.symlink_to(secret)
    _fails(
        inputs,
        _definitions(),
        r"^collection hospital_a: .*c99-0.png leads through a symbolic link to .*secret.png, outside ",
    )
    link.unlink()
    normal = inputs / "external" / "hospital_a" / "normal"
    normal.rename(outside / "normal")
    normal.symlink_to(outside / "normal", target_is_directory=True)  # a class folder that is a link out
    _fails(
        inputs,
        _definitions(),
        r"^collection hospital_a: .*normal/n00-0.png leads through a symbolic link to .*, outside ",
    )
    normal.unlink()
    (outside / "normal").rename(normal)
    (inputs / "external" / "hospital_b" / "img" / "covid-19" / "0.png").unlink()
    (inputs / "external" / "hospital_b" / "img" / "covid-19" / "0.png").symlink_to(secret)
    _fails(
        inputs,
        _definitions(),
        r"^collection hospital_b: .*0.png leads through a symbolic link to .*secret.png, outside ",
    )
