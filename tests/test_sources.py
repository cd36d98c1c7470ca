"""sources.py: roles per class, the no-overlap rule, the external set without copies of training images."""

import numpy as np
import pandas as pd
import pytest

from covidxray import CovidXrayError
from covidxray.data import sources
from covidxray.data.collections import provides

BINARY = ["normal", "covid"]
# What the shipped collection definitions provide (tests/test_collections.py checks it against conf/).
PROVIDES = {"ieee8023": ("pneumonia", "covid"), "kermany": ("normal", "pneumonia"), "radiography": ("normal", "covid")}
DEFAULT = {
    "train": {"covid": ["ieee8023"], "normal": ["kermany"]},
    "external": {"covid": ["radiography"], "normal": ["radiography"]},
}


def test_default_and_reverse_roles_are_valid():
    sources.check_roles(DEFAULT, BINARY, PROVIDES)
    reverse = {"train": DEFAULT["external"], "external": DEFAULT["train"]}
    sources.check_roles(reverse, BINARY, PROVIDES)


@pytest.mark.parametrize(
    "roles, message",
    [
        (
            {
                "train": {"covid": ["ieee8023", "radiography"], "normal": ["kermany"]},
                "external": {"covid": ["radiography"]},
            },
            r"\['radiography'\] are in both roles for class 'covid'",
        ),
        (
            {"train": {"covid": ["chexpert"], "normal": ["kermany"]}},
            r"data.sources.train.covid: unknown collection 'chexpert' \(allowed: ieee8023, kermany, radiography; ",
        ),
        ({"train": {"covid": ["kermany"], "normal": ["kermany"]}}, "collection 'kermany' has no covid images"),
        ({"train": {"covid": ["ieee8023"]}}, r"data.sources.train.normal: no collection trains class 'normal'"),
        (
            {"train": DEFAULT["train"], "external": {"pneumonia": ["kermany"]}},
            r"data.sources.external.pneumonia: class 'pneumonia' is not a class of this task "
            r"\(allowed: normal, covid\)",
        ),
        ({"train": DEFAULT["train"], "holdout": {}}, "unknown role"),
    ],
)
def test_bad_roles_name_the_key(roles, message):
    with pytest.raises(CovidXrayError, match=message):
        sources.check_roles(roles, BINARY, PROVIDES)


def _index():
    return pd.DataFrame(
        {
            "image_id": ["c1", "c2", "n1", "n2", "rc1", "rc2", "rn1", "rn2"],
            "label": ["covid", "covid", "normal", "normal", "covid", "covid", "normal", "normal"],
            "source": ["ieee8023"] * 2 + ["kermany"] * 2 + ["radiography"] * 4,
            # rc2 near-duplicates c1 (same dup_group): it must not count as external
            "dup_group": ["c1", "c2", "n1", "n2", "rc1", "c1", "rn1", "rn2"],
        }
    )


def test_in_role_and_external_set_drops_copies_of_training_images():
    index = _index()
    assert sources.in_role(index, DEFAULT["train"]).tolist() == [True] * 4 + [False] * 4
    mask, dropped = sources.external_set(index, DEFAULT)
    assert index.loc[mask, "image_id"].tolist() == ["rc1", "rn1", "rn2"] and dropped == 1


def test_check_present_and_model_roles():
    index = _index()
    sources.check_present(DEFAULT, index, "curated")
    with pytest.raises(CovidXrayError, match="no normal images of ieee8023"):
        sources.check_present({"train": {"normal": ["ieee8023"]}}, index, "curated")
    assert sources.model_roles(DEFAULT, None) == DEFAULT
    assert sources.model_roles(None, DEFAULT) == DEFAULT
    with pytest.raises(CovidXrayError, match="differ from the model's"):
        sources.model_roles(DEFAULT, {"train": DEFAULT["external"], "external": DEFAULT["train"]})


def test_balance_whole_patients_and_deterministic():
    index = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(30)],
            "label": ["normal"] * 20 + ["covid"] * 10,
            "patient_id": [f"n{k // 2}" for k in range(20)] + [f"c{k}" for k in range(10)],
        }
    )
    assert sources.balance(index, "none", 0).equals(index)
    out = sources.balance(index, "undersample", 7)
    assert (out["label"] == "covid").sum() == 10 and (out["label"] == "normal").sum() == 10
    assert out.groupby("patient_id").size().eq(index.groupby("patient_id").size()[out["patient_id"].unique()]).all()
    assert sources.balance(index, "undersample", 7).equals(out)
    assert not sources.balance(index, "undersample", 8).equals(out)
    with pytest.raises(CovidXrayError, match="data.balance must be one of none, undersample"):
        sources.balance(index, "oversample", 0)


def test_role_table():
    index = _index()
    splits = pd.DataFrame({"image_id": index["image_id"], "partition": ["cv", "test"] * 4, "fold": 0})
    roles = {"train": DEFAULT["train"], "external": {"covid": ["radiography"]}}
    table = sources.role_table(index, splits, roles)
    assert table["partition"].tolist() == ["cv", "test", "cv", "test", "external", "external", "unused", "unused"]
    assert np.array_equal(table["image_id"], index["image_id"])


def test_roles_accept_any_configured_collection(repo_root):
    """A collection defined in data.collections is a valid source without a code change."""
    from omegaconf import OmegaConf

    definitions = OmegaConf.load(repo_root / "params.yaml").data.collections
    assert provides(definitions) == PROVIDES
    assert provides(definitions, "binary") == {
        "ieee8023": ("covid",),
        "kermany": ("normal",),
        "radiography": ("normal", "covid"),
    }
    hospital = {**PROVIDES, "hospital": ("covid", "normal")}
    roles = {"train": {"covid": ["ieee8023", "hospital"], "normal": ["kermany"]}, "external": {"normal": ["hospital"]}}
    sources.check_roles(roles, BINARY, hospital)
    with pytest.raises(CovidXrayError, match="unknown collection 'hospital'"):
        sources.check_roles(roles, BINARY, PROVIDES)
