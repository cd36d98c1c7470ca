"""curate: the shipped collections' selection rules and patient ids, deduplication, the probe set,
shortcut AUC, and the stage end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from covidxray import CovidXrayError
from covidxray.data import audit as A
from covidxray.data import curation, dedupe, listing
from covidxray.data.collections import TASKS, parse_collections
from covidxray.data.images import load_curated
from covidxray.settings.curate import curate_settings
from covidxray.stages import curate

SIZE = 32


@pytest.fixture(scope="module")
def shipped(repo_root):
    """The three shipped collection definitions, as composed into data.collections."""
    cfg = OmegaConf.load(repo_root / "params.yaml")
    return {c.name: c for c in parse_collections(cfg.data.collections)}


# ---------- selection and patient ids ----------


@pytest.mark.parametrize(
    "name, patient",
    [
        ("IM-0587-0001.jpeg", "kermany-IM-0587"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "kermany-IM-0587"),
        ("IM-0011-0001-0002.jpeg", "kermany-IM-0011"),
        ("person1261_virus_2147.jpeg", "kermany-person1261"),
        ("person3_bacteria_10.jpeg", "kermany-person3"),
        ("scan.jpeg", None),
    ],
)
def test_kermany_patient_from_the_file_name(shipped, name, patient):
    if patient is None:
        with pytest.raises(
            CovidXrayError, match=r"collection kermany: cannot tell the patient of scan.jpeg .*patient\)"
        ):
            listing._patients(shipped["kermany"], [Path(name)], None)
    else:
        assert listing._patients(shipped["kermany"], [Path(name)], None) == [patient]


@pytest.mark.parametrize(
    "finding, binary, three",
    [
        ("COVID-19", "covid", "covid"),
        ("COVID-19, ARDS", "covid", "covid"),
        ("Streptococcus", None, "pneumonia"),
        ("Mycoplasma Bacterial Pneumonia", None, "pneumonia"),
        ("E.Coli", None, "pneumonia"),
        ("SARS", None, "pneumonia"),
        ("Pneumonia", None, "pneumonia"),
        ("No Finding", None, None),
        ("ARDS", None, None),
        ("Lipoid", None, None),
    ],
)
def test_ieee8023_finding_to_class(shipped, finding, binary, three):
    cls, _, _ = shipped["ieee8023"].classify(finding)
    assert (cls if cls in TASKS["binary"] else None) == binary
    assert (cls if cls in TASKS["three_class"] else None) == three


def _metadata(tmp_path, meta: pd.DataFrame) -> Path:
    (tmp_path / "raw").mkdir()
    meta.to_csv(tmp_path / "raw" / "metadata.csv", index=False)
    return tmp_path / "raw"


def _select(shipped, raw, views, task):
    """ieee8023's records and probe from a metadata.csv in raw, with data.views = views."""
    c = shipped["ieee8023"]
    c = dataclasses.replace(c, filters=(("modality", ("X-ray",)), ("views", tuple(views))))
    return listing.list_table(c, raw, raw, task)


def test_select_collection(shipped, tmp_path):
    meta = pd.DataFrame(
        {
            "patientid": ["1", "1", "2", "3", "4", "5"],
            "finding": ["COVID-19", "COVID-19", "Klebsiella", "COVID-19", "No Finding", "COVID-19"],
            "modality": ["X-ray", "X-ray", "X-ray", "CT", "X-ray", "X-ray"],
            "view": ["PA", "AP", "PA", "PA", "PA", "PA"],
            "folder": ["images"] * 6,
            "filename": ["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg", "f.jpg"],
            "sex": ["M", "M", "F", None, "F", "X"],
            "age": [50, 50, None, 30, 20, 71],
        }
    )
    raw = _metadata(tmp_path, meta)
    binary, _ = _select(shipped, raw, ["PA"], "binary")
    assert list(binary["file"]) == [f"{raw.as_posix()}/images/a.jpg", f"{raw.as_posix()}/images/f.jpg"]
    assert list(binary["patient_id"]) == ["ieee8023-1", "ieee8023-5"]
    assert list(binary["sex"]) == ["M", "unknown"]
    three, _ = _select(shipped, raw, ["PA", "AP"], "three_class")
    assert list(three["label"]) == ["covid", "covid", "pneumonia", "covid"]
    assert np.isnan(three["age"].iloc[2])


def test_curate_settings_name_key_and_values(repo_root):
    ok = OmegaConf.load(repo_root / "params.yaml")
    settings = curate_settings(ok)
    assert [c.name for c in settings.collections] == ["ieee8023", "kermany", "radiography"]
    for key, bad, allowed in [
        ("task", "four_class", "binary, three_class"),
        ("resize", "squash", "stretch, pad, crop"),
    ]:
        cfg = ok.copy()
        cfg.data[key] = bad
        with pytest.raises(CovidXrayError, match=f"data.{key} must be one of {allowed}"):
            curate_settings(cfg)
    cfg = ok.copy()
    cfg.data.phash_distance = 65
    with pytest.raises(CovidXrayError, match="data.phash_distance must be an integer in 0..64"):
        curate_settings(cfg)


def test_select_probe_keeps_adult_other_findings(shipped, tmp_path):
    meta = pd.DataFrame(
        {
            "patientid": ["1", "2", "3", "4", "5", "6"],
            "finding": ["COVID-19", "ARDS", "Streptococcus", "No Finding", "Pneumocystis", "ARDS"],
            "modality": ["X-ray"] * 6,
            "view": ["PA", "PA", "PA", "PA", "AP", "PA"],
            "folder": ["images"] * 6,
            "filename": [f"{k}.jpg" for k in "abcdef"],
            "sex": ["M"] * 6,
            "age": [50, 60, 40, None, 30, 12],
        }
    )
    raw = _metadata(tmp_path, meta)
    _, binary = _select(shipped, raw, ["PA"], "binary")
    assert list(binary["finding"]) == ["ARDS", "Streptococcus", "No Finding"]  # not COVID, not AP, not a child
    assert set(binary["label"]) == {"other"} and set(binary["source"]) == {"ieee8023"}
    _, three = _select(shipped, raw, ["PA"], "three_class")
    assert list(three["finding"]) == ["ARDS", "No Finding"]  # pneumonia is a class there


# ---------- dedupe with synthetic images ----------


def _texture(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random texture (distinct seeds give distant perceptual hashes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _records(tmp_path, specs) -> pd.DataFrame:
    """Write one PNG per spec (name, pixels, label, patient) and decode them as curate does."""
    rows = []
    for name, pixels, label, patient in specs:
        path = tmp_path / f"{name}.png"
        if not path.exists():
            Image.fromarray(pixels).save(path)
        rows.append({"image_id": name, "label": label, "patient_id": patient, "file": str(path), "source": "one"})
    df = pd.DataFrame(rows)
    decoded = {d["file"]: d for d in curation.decode_files(sorted(set(df["file"])), SIZE, "stretch")}
    for col in ("sha256", "phash"):
        df[col] = [decoded[f][col] for f in df["file"]]
    return df


def test_dedupe_exact_near_and_conflicts(tmp_path):
    a, b, c, d = (_texture(s) for s in (1, 2, 3, 4))
    a_shifted = np.clip(a.astype(int) + 6, 0, 255).astype(np.uint8)  # near-duplicate of a (brighter)
    c_copy = tmp_path / "c2.png"
    specs = [
        ("a", a, "covid", "p1"),
        ("a_copy", a, "covid", "p2"),  # exact duplicate
        ("a_near", a_shifted, "covid", "p3"),  # near-duplicate
        ("b", b, "normal", "p4"),
        ("c", c, "covid", "p5"),
        ("c2", c, "normal", "p6"),  # same image, two classes
        ("d", d, "normal", "p7"),
        ("d_near", np.clip(d.astype(int) - 5, 0, 255).astype(np.uint8), "covid", "p8"),
    ]
    records = _records(tmp_path, specs)
    assert c_copy.exists()
    kept, report = dedupe.dedupe(records, phash_distance=4)
    assert sorted(kept["image_id"]) == ["a", "a_near", "b"]
    assert report["exact_duplicates_removed"] == 1
    assert report["cross_class_images_dropped"] == 4
    assert {c["kind"] for c in report["cross_class_conflicts"]} == {"exact", "near"}
    assert len(report["near_duplicate_groups"]) == 1
    # a, a_copy and a_near are tied to one patient group (the smallest id)
    assert set(kept.loc[kept["image_id"].isin(["a", "a_near"]), "patient_id"]) == {"p1"}
    assert kept.loc[kept["image_id"] == "b", "patient_id"].item() == "p4"
    # near-duplicates share one dup_group (the smallest id): the external set drops copies by it
    assert set(kept.loc[kept["image_id"].isin(["a", "a_near"]), "dup_group"]) == {"a"}
    assert kept.loc[kept["image_id"] == "b", "dup_group"].item() == "b"


@pytest.mark.parametrize("order", [["zeta", "alpha"], ["alpha", "zeta"]])
def test_exact_copies_keep_the_image_of_the_collection_listed_first(tmp_path, order):
    """A new collection repeating pinned images loses its copies, whatever the names sort as: the
    copy kept is that of the collection first in data.collections; the report counts the losses."""
    a, b, c = (_texture(s) for s in (1, 2, 3))
    records = _records(
        tmp_path,
        [("zeta-a", a, "covid", "z1"), ("zeta-b", b, "covid", "z2"), ("zeta-c", c, "normal", "z3")]
        + [("alpha-a", a, "covid", "a1"), ("alpha-b", b, "covid", "a2"), ("alpha-b2", b, "covid", "a3")],
    )
    records["source"] = records["image_id"].str.split("-").str[0]
    kept, report = dedupe.dedupe(records, phash_distance=0, order=order)
    first, second = order
    assert set(kept.loc[kept["image_id"].str.endswith(("-a", "-b")), "source"]) == {first}
    assert report["exact_duplicates_removed"] == 3
    assert report["exact_duplicates_removed_from"] == ({"alpha": 3} if first == "zeta" else {"zeta": 2, "alpha": 1})
    assert [g["kept"] for g in report["exact_duplicate_groups"]] == [first, first]
    assert sorted(kept["image_id"]) == sorted([f"{first}-a", f"{first}-b", "zeta-c"])  # one of each, c kept


def test_clean_probe_drops_copies_of_curated_images(tmp_path):
    a, b, c = (_texture(s) for s in (1, 2, 3))
    kept = _records(tmp_path, [("a", a, "covid", "p1")])
    probe = _records(
        tmp_path,
        [
            ("a_probe", np.clip(a.astype(int) + 6, 0, 255).astype(np.uint8), "other", "p2"),
            ("b", b, "other", "p3"),
            ("b_copy", b, "other", "p4"),
            ("c", c, "other", "p5"),
        ],
    )
    cleaned, dropped = dedupe.clean_probe(probe, kept, phash_distance=4)
    assert sorted(cleaned["image_id"]) == ["b", "c"] and dropped == 1


def test_phash_pairs():
    assert dedupe.phash_pairs(["ffff000000000000", "ffff000000000001", "0000ffffffffffff"], 1) == [(0, 1)]
    assert dedupe.phash_pairs(["00"], 4) == []


# ---------- shortcut AUC ----------


def test_shortcut_auc():
    """Each table's AUC on the same patient folds: a leaky width separates, noise does not, three
    classes give the macro AUC; one class, or one patient a class, is None for every table."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    groups = np.arange(80) // 2
    leaky = pd.DataFrame({"width": np.where(y == 1, 1000.0, 512.0) + rng.normal(0, 5, 80)})
    noise = pd.DataFrame({"width": rng.normal(0, 1, 80)})
    found = A.shortcut_aucs({"leaky": leaky, "noise": noise}, y, groups, seed=0)
    assert found["leaky"]["auc"] > 0.95 and 0.2 < found["noise"]["auc"] < 0.8
    assert found["noise"] == A.shortcut_aucs({"alone": noise}, y, groups, seed=0)["alone"]  # tables do not interact
    y3 = np.repeat([0, 1, 2], 20)
    three = pd.DataFrame({"w": y3 * 100.0})
    assert A.shortcut_aucs({"w": three}, y3, np.arange(60), seed=0)["w"]["auc"] > 0.95
    tables = {"leaky": leaky, "noise": noise}
    assert A.shortcut_aucs(tables, np.zeros(80), groups, seed=0) == {"leaky": None, "noise": None}
    assert A.shortcut_aucs({"leaky": leaky}, y, np.zeros(80), seed=0) == {"leaky": None}


# ---------- the stage end to end on a small real subset ----------


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, collection_dir, external_dir):
    """A raw dir with ~10 COVID and 3 pneumonia PA rows (+1 missing file) and an external dir with 10 + 4 images."""
    root = tmp_path_factory.mktemp("inputs")
    meta = pd.read_csv(collection_dir / "metadata.csv", dtype=str)
    pa = meta[(meta["modality"] == "X-ray") & (meta["view"] == "PA")]
    present = pa[pa["filename"].map(lambda f: (collection_dir / "images" / f).is_file())]
    present = present.assign(size=present["filename"].map(lambda f: (collection_dir / "images" / f).stat().st_size))
    small = present[present["size"] < 400_000]
    covid = small[small["finding"] == "COVID-19"].head(10)
    pneumonia = small[small["finding"].isin(["Streptococcus", "Klebsiella", "Pneumocystis"])].head(3)
    other = small[small["finding"].isin(["ARDS", "No Finding"]) & ~(pd.to_numeric(small["age"]) < 18)].head(2)
    missing = pa[~pa["filename"].isin(present["filename"]) & (pa["finding"] == "COVID-19")].head(1)
    rows = pd.concat([covid, pneumonia, other, missing])
    (root / "raw" / "images").mkdir(parents=True)
    rows.to_csv(root / "raw" / "metadata.csv", index=False)
    for f in pd.concat([covid, pneumonia, other])["filename"]:
        shutil.copy(collection_dir / "images" / f, root / "raw" / "images" / f)
    src = external_dir / "chest_xray"
    normal = ["NORMAL2-IM-0587-0001-0001.jpeg", "NORMAL2-IM-0587-0001-0002.jpeg"]  # byte-identical pair
    normal += sorted(p.name for p in (src / "NORMAL").iterdir() if p.name.startswith("IM-"))[:8]
    virus = sorted(p.name for p in (src / "PNEUMONIA").iterdir())[:4]
    for folder, names in (("NORMAL", normal), ("PNEUMONIA", virus)):
        (root / "external" / "chest_xray" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(src / folder / name, root / "external" / "chest_xray" / folder / name)
    for folder in ("COVID", "Normal"):
        (root / "external" / "covid19-radiography" / folder).mkdir(parents=True)
        for path in sorted((external_dir / "covid19-radiography" / folder).iterdir())[:4]:
            shutil.copy(path, root / "external" / "covid19-radiography" / folder / path.name)
    assert len(other) == 2
    return root, len(covid), len(pneumonia)


def _cfg(repo_root, root, out, **data):
    cfg = OmegaConf.load(repo_root / "params.yaml")
    cfg.paths.raw, cfg.paths.external, cfg.paths.curated = str(root / "raw"), str(root / "external"), str(out)
    cfg.data.image_size = cfg.data.store_size = SIZE
    for key, value in data.items():
        if key == "collections":  # a subset of the shipped definitions, by name
            value = {name: cfg.data.collections[name] for name in value}
        cfg.data[key] = value
    return cfg


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("task", ["binary", "three_class"])
def test_curate_end_to_end(repo_root, small_inputs, tmp_path, task):
    root, n_covid, n_pneu = small_inputs
    out = tmp_path / "curated"
    curate.main(_cfg(repo_root, root, out, task=task))
    imgs, index, classes = load_curated(out)
    expected = ["normal", "covid"] if task == "binary" else ["normal", "pneumonia", "covid"]
    assert classes == expected
    assert list(index.columns) == curation.COLUMNS
    assert imgs.dtype == np.uint8 and imgs.shape == (len(index), SIZE, SIZE)
    assert index["image_id"].is_unique and index["patient_id"].notna().all()
    assert (index["y"] == index["label"].map(expected.index)).all()
    assert index.equals(index.sort_values(["y", "image_id"]).reset_index(drop=True))
    counts = index["label"].value_counts()
    assert counts["covid"] == n_covid + 4 and counts["normal"] == 9 + 4  # one of the identical pair removed
    if task == "three_class":
        assert counts["pneumonia"] == n_pneu + 4
    assert set(index["source"]) == {"ieee8023", "kermany", "radiography"}
    assert (index.loc[index["source"] == "radiography", "patient_id"].str.startswith("radiography-")).all()
    assert index["dup_group"].notna().all()
    probe = pd.read_csv(out / "probe.csv")
    assert len(probe) == (2 + n_pneu if task == "binary" else 2) and set(probe["label"]) == {"other"}
    assert np.load(out / "probe.npy").shape == (len(probe), SIZE, SIZE)
    assert set(index.loc[index["source"] == "kermany", "patient_id"].str[:8]) == {"kermany-"}
    assert (index.loc[index["source"] == "ieee8023", "patient_id"].str.startswith("ieee8023-")).all()
    assert set(index["orig_format"]) <= {"JPEG", "PNG"}

    audit = json.loads((out / "audit.json").read_text())
    assert audit["per_class"] == {c: int(counts[c]) for c in expected}
    assert audit["dedupe"]["exact_duplicates_removed"] == 1
    assert len(audit["selection"]["missing_files"]) == 1
    for value in audit["shortcut_auc"].values():
        assert value is not None and 0.0 <= value <= 1.0
    assert audit["geometry"]["normal"]["width"]["max"] == 512
    assert "# Curated data audit" in (out / "audit.md").read_text()

    again = tmp_path / "again"
    curate.main(_cfg(repo_root, root, again, task=task))
    assert _files(out) == _files(again)


def test_curate_one_collection(repo_root, small_inputs, tmp_path):
    root, _, _ = small_inputs
    out = tmp_path / "curated"
    curate.main(_cfg(repo_root, root, out, collections=["radiography"]))
    images, index, _ = load_curated(out)
    assert set(index["source"]) == {"radiography"} and len(index) == 8 and images.shape[1:] == (SIZE, SIZE)
    assert len(pd.read_csv(out / "probe.csv")) == 0


def test_curate_rejects_bad_config_and_leaves_nothing(repo_root, small_inputs, tmp_path):
    root, _, _ = small_inputs
    out = tmp_path / "data" / "curated"
    with pytest.raises(CovidXrayError, match=r"data\.resize must be one of stretch, pad, crop"):
        curate.main(_cfg(repo_root, root, out, resize="squash"))
    assert not (tmp_path / "data").exists()
    with pytest.raises(CovidXrayError, match=r"collection ieee8023: file missing: .*metadata.csv"):
        curate.main(_cfg(repo_root, tmp_path / "nowhere", out))
    assert not out.exists() and not list(out.parent.glob(".curated*"))


def test_a_collection_alone_has_no_shortcut_auc_against_the_rest():
    """Where one collection is the whole set there is no rest to tell it from: None for each
    feature table; beside a second collection each table gets its AUC."""
    index = pd.DataFrame(
        {
            "source": ["a"] * 20 + ["b"] * 20,
            "patient_id": [f"p{i}" for i in range(40)],
            "label": ["covid", "normal"] * 20,
            "orig_width": [1000.0] * 20 + [500.0] * 20,
            "orig_height": 800.0,
            "orig_format": "PNG",
            "orig_mode": "L",
            "age": np.nan,
        }
    )
    features = {"geometry_format": A.geometry_features(index), "pixel_stats": pd.DataFrame({"m": np.arange(40.0)})}
    alone = A.collection_facts(index[:20], {k: f[:20] for k, f in features.items()}, {"a": {}}, seed=0)
    assert alone["a"]["shortcut_auc_vs_rest"] == {"geometry_format": None, "pixel_stats": None}
    both = A.collection_facts(index, features, {"a": {}, "b": {}}, seed=0)
    assert both["a"]["shortcut_auc_vs_rest"]["geometry_format"] == 1.0


def test_shortcut_aucs_per_class_exposes_one_separable_class():
    y = np.repeat([0, 1, 2], 30)
    feats = pd.DataFrame({"w": np.where(y == 2, 1000.0, 512.0)})  # only class 2 is separable
    result = A.shortcut_aucs({"w": feats}, y, np.arange(90), seed=0)["w"]
    assert result["per_class"][2] > 0.95 and result["auc"] < result["per_class"][2]


def test_curate_fails_on_a_corrupt_image_and_leaves_nothing(repo_root, small_inputs, tmp_path):
    root, _, _ = small_inputs
    broken = tmp_path / "inputs"
    shutil.copytree(root, broken)
    victim = sorted((broken / "external" / "chest_xray" / "NORMAL").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "curated"
    with pytest.raises(CovidXrayError, match=victim.name):
        curate.main(_cfg(repo_root, broken, out))
    assert not out.exists() and not list(tmp_path.glob(".curated*"))
