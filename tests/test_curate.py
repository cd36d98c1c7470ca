"""curate.py: selection rules, patient ids, deduplication, balancing, shortcut AUC, and the stage end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from covidxray import CovidXrayError, curate
from covidxray.images import load_curated

SIZE = 32


# ---------- selection and patient ids ----------

@pytest.mark.parametrize("name, patient", [
    ("IM-0587-0001.jpeg", "kermany-IM-0587"),
    ("NORMAL2-IM-0587-0001-0002.jpeg", "kermany-IM-0587"),
    ("IM-0011-0001-0002.jpeg", "kermany-IM-0011"),
    ("person1261_virus_2147.jpeg", "kermany-person1261"),
    ("person3_bacteria_10.jpeg", "kermany-person3"),
    ("scan.jpeg", None),
])
def test_patient_id_from_kaggle_name(name, patient):
    assert curate.patient_id_from_kaggle_name(name) == patient


@pytest.mark.parametrize("finding, binary, three", [
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
])
def test_collection_label(finding, binary, three):
    assert curate.collection_label(finding, "binary") == binary
    assert curate.collection_label(finding, "three_class") == three


def test_select_collection():
    meta = pd.DataFrame({
        "patientid": ["1", "1", "2", "3", "4", "5"],
        "finding": ["COVID-19", "COVID-19", "Klebsiella", "COVID-19", "No Finding", "COVID-19"],
        "modality": ["X-ray", "X-ray", "X-ray", "CT", "X-ray", "X-ray"],
        "view": ["PA", "AP", "PA", "PA", "PA", "PA"],
        "folder": ["images"] * 6,
        "filename": ["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg", "f.jpg"],
        "sex": ["M", "M", "F", None, "F", "X"],
        "age": [50, 50, None, 30, 20, 71],
    })
    binary = curate.select_collection(meta, ["PA"], "binary", raw_dir="raw")
    assert list(binary["file"]) == ["raw/images/a.jpg", "raw/images/f.jpg"]
    assert list(binary["patient_id"]) == ["ieee8023-1", "ieee8023-5"]
    assert list(binary["sex"]) == ["M", "unknown"]
    three = curate.select_collection(meta, ["PA", "AP"], "three_class", raw_dir="raw")
    assert list(three["label"]) == ["covid", "covid", "pneumonia", "covid"]
    assert np.isnan(three["age"].iloc[2])


def test_check_params_names_key_and_values():
    ok = dict(task="binary", resize="stretch", balance="none", image_size=32, phash_distance=4, views=["PA"])
    curate.check_params(**ok)
    for key, bad, allowed in [("task", "four_class", "binary, three_class"),
                              ("resize", "squash", "stretch, pad, crop"),
                              ("balance", "oversample", "none, undersample")]:
        with pytest.raises(CovidXrayError, match=f"data.{key} must be one of {allowed}"):
            curate.check_params(**{**ok, key: bad})


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
        rows.append({"image_id": name, "label": label, "patient_id": patient, "file": str(path)})
    df = pd.DataFrame(rows)
    decoded = {d["file"]: d for d in curate.decode_files(sorted(set(df["file"])), SIZE, "stretch")}
    for col in ("sha256", "phash"):
        df[col] = [decoded[f][col] for f in df["file"]]
    return df


def test_dedupe_exact_near_and_conflicts(tmp_path):
    a, b, c, d = (_texture(s) for s in (1, 2, 3, 4))
    a_shifted = np.clip(a.astype(int) + 6, 0, 255).astype(np.uint8)   # near-duplicate of a (brighter)
    c_copy = tmp_path / "c2.png"
    specs = [("a", a, "covid", "p1"), ("a_copy", a, "covid", "p2"),     # exact duplicate
             ("a_near", a_shifted, "covid", "p3"),                       # near-duplicate
             ("b", b, "normal", "p4"),
             ("c", c, "covid", "p5"), ("c2", c, "normal", "p6"),        # same image, two classes
             ("d", d, "normal", "p7"), ("d_near", np.clip(d.astype(int) - 5, 0, 255).astype(np.uint8), "covid", "p8")]
    records = _records(tmp_path, specs)
    assert c_copy.exists()
    kept, report = curate.dedupe(records, phash_distance=4)
    assert sorted(kept["image_id"]) == ["a", "a_near", "b"]
    assert report["exact_duplicates_removed"] == 1
    assert report["cross_class_images_dropped"] == 4
    assert {c["kind"] for c in report["cross_class_conflicts"]} == {"exact", "near"}
    assert len(report["near_duplicate_groups"]) == 1
    # a, a_copy and a_near are tied to one patient group (the smallest id)
    assert set(kept.loc[kept["image_id"].isin(["a", "a_near"]), "patient_id"]) == {"p1"}
    assert kept.loc[kept["image_id"] == "b", "patient_id"].item() == "p4"


def test_phash_pairs():
    assert curate.phash_pairs(["ffff000000000000", "ffff000000000001", "0000ffffffffffff"], 1) == [(0, 1)]
    assert curate.phash_pairs(["00"], 4) == []


# ---------- balance and shortcut AUC ----------

def test_balance_whole_patients_and_deterministic():
    index = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(30)],
        "label": ["normal"] * 20 + ["covid"] * 10,
        "patient_id": [f"n{k // 2}" for k in range(20)] + [f"c{k}" for k in range(10)],
    })
    assert curate.balance(index, "none", 0).equals(index)
    out = curate.balance(index, "undersample", 7)
    assert (out["label"] == "covid").sum() == 10 and (out["label"] == "normal").sum() == 10
    assert out.groupby("patient_id").size().eq(index.groupby("patient_id").size()[out["patient_id"].unique()]).all()
    assert curate.balance(index, "undersample", 7).equals(out)
    assert not curate.balance(index, "undersample", 8).equals(out)


def test_shortcut_auc():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    groups = np.arange(80) // 2
    leaky = pd.DataFrame({"width": np.where(y == 1, 1000.0, 512.0) + rng.normal(0, 5, 80)})
    assert curate.shortcut_auc(leaky, y, groups, seed=0) > 0.95
    noise = pd.DataFrame({"width": rng.normal(0, 1, 80)})
    assert 0.2 < curate.shortcut_auc(noise, y, groups, seed=0) < 0.8
    y3 = np.repeat([0, 1, 2], 20)
    three = pd.DataFrame({"w": y3 * 100.0})
    assert curate.shortcut_auc(three, y3, np.arange(60), seed=0) > 0.95
    assert curate.shortcut_auc(leaky, np.zeros(80), groups, seed=0) is None


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
    missing = pa[~pa["filename"].isin(present["filename"]) & (pa["finding"] == "COVID-19")].head(1)
    rows = pd.concat([covid, pneumonia, missing])
    (root / "raw" / "images").mkdir(parents=True)
    rows.to_csv(root / "raw" / "metadata.csv", index=False)
    for f in pd.concat([covid, pneumonia])["filename"]:
        shutil.copy(collection_dir / "images" / f, root / "raw" / "images" / f)
    src = external_dir / "chest_xray"
    normal = ["NORMAL2-IM-0587-0001-0001.jpeg", "NORMAL2-IM-0587-0001-0002.jpeg"]  # byte-identical pair
    normal += sorted(p.name for p in (src / "NORMAL").iterdir() if p.name.startswith("IM-"))[:8]
    virus = sorted(p.name for p in (src / "PNEUMONIA").iterdir())[:4]
    for folder, names in (("NORMAL", normal), ("PNEUMONIA", virus)):
        (root / "external" / "chest_xray" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(src / folder / name, root / "external" / "chest_xray" / folder / name)
    return root, len(covid), len(pneumonia)


def _cfg(repo_root, root, out, **data):
    cfg = OmegaConf.load(repo_root / "params.yaml")
    cfg.paths.raw, cfg.paths.external, cfg.paths.curated = str(root / "raw"), str(root / "external"), str(out)
    cfg.data.image_size = SIZE
    for key, value in data.items():
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
    assert list(index.columns) == curate.COLUMNS
    assert imgs.dtype == np.uint8 and imgs.shape == (len(index), SIZE, SIZE)
    assert index["image_id"].is_unique and index["patient_id"].notna().all()
    assert (index["y"] == index["label"].map(expected.index)).all()
    assert index.equals(index.sort_values(["y", "image_id"]).reset_index(drop=True))
    counts = index["label"].value_counts()
    assert counts["covid"] == n_covid and counts["normal"] == 9          # one of the identical pair removed
    if task == "three_class":
        assert counts["pneumonia"] == n_pneu + 4
    assert set(index["source"]) == {"ieee8023", "kermany"}
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


def test_curate_balance_and_pad(repo_root, small_inputs, tmp_path):
    root, n_covid, _ = small_inputs
    out = tmp_path / "curated"
    curate.main(_cfg(repo_root, root, out, balance="undersample", resize="pad"))
    _, index, _ = load_curated(out)
    counts = index["label"].value_counts()
    assert counts["normal"] <= n_covid and counts["covid"] <= 9


def test_curate_rejects_bad_config_and_leaves_nothing(repo_root, small_inputs, tmp_path):
    root, _, _ = small_inputs
    out = tmp_path / "data" / "curated"
    with pytest.raises(CovidXrayError, match=r"data\.resize must be one of stretch, pad, crop"):
        curate.main(_cfg(repo_root, root, out, resize="squash"))
    assert not (tmp_path / "data").exists()
    with pytest.raises(CovidXrayError, match="metadata missing"):
        curate.main(_cfg(repo_root, tmp_path / "nowhere", out))
    assert not out.exists() and not list(out.parent.glob(".curated*"))


def test_shortcut_aucs_per_class_exposes_one_separable_class():
    y = np.repeat([0, 1, 2], 30)
    feats = pd.DataFrame({"w": np.where(y == 2, 1000.0, 512.0)})     # only class 2 is separable
    result = curate.shortcut_aucs(feats, y, np.arange(90), seed=0)
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
