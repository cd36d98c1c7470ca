"""split: no patient in two partitions, class proportions kept, deterministic."""

import numpy as np
import pandas as pd
import pytest

from covidxray import CovidXrayError
from covidxray.stages.split import make_splits


def _index(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "covid" if p % 3 == 0 else "normal"
        for k in range(rng.integers(1, 4)):
            rows.append({"image_id": f"{p}-{k}", "patient_id": f"p{p}", "label": label})
    return pd.DataFrame(rows)


def test_no_patient_in_two_partitions_or_folds():
    splits = make_splits(_index(), test_fraction=0.2, folds=5, seed=1)
    places = splits.groupby("patient_id")[["partition", "fold"]].nunique()
    assert (places == 1).all().all()
    assert set(splits.loc[splits.partition == "cv", "fold"]) == set(range(5))
    assert (splits.loc[splits.partition == "test", "fold"] == -1).all()


def test_class_proportions_per_fold():
    index = _index(150)
    splits = make_splits(index, test_fraction=0.2, folds=5, seed=1)
    overall = (index.label == "covid").mean()
    share = splits.groupby(["partition", "fold"])["label"].apply(lambda s: (s == "covid").mean())
    assert np.allclose(share, overall, atol=0.12)
    test_share = (splits.partition == "test").mean()
    assert 0.12 < test_share < 0.28


def test_deterministic_by_seed():
    index = _index()
    a = make_splits(index, 0.2, 5, seed=3)
    b = make_splits(index, 0.2, 5, seed=3)
    c = make_splits(index, 0.2, 5, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


@pytest.mark.parametrize("fraction,folds", [(0.0, 5), (1.0, 5), (0.2, 1)])
def test_bad_parameters_stop_the_stage_naming_the_key(fraction, folds, tmp_path):
    """settings.split_settings checks them before the index is read; nothing is written."""
    from conftest import make_cfg
    from covidxray.stages.split import main

    (tmp_path / "curated").mkdir()
    _index().to_csv(tmp_path / "curated" / "index.csv", index=False)
    overrides = [f"split.test_fraction={fraction}", f"split.folds={folds}", f"paths.curated={tmp_path / 'curated'}"]
    with pytest.raises(CovidXrayError, match="split.test_fraction" if folds > 1 else "split.folds"):
        main(make_cfg([*overrides, f"paths.splits={tmp_path / 'splits.csv'}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]


def test_the_stage_writes_its_file_whole(tmp_path):
    from conftest import make_cfg
    from covidxray.stages.split import main

    (tmp_path / "curated").mkdir()
    _index().to_csv(tmp_path / "curated" / "index.csv", index=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("not split's")
    main(make_cfg([f"paths.curated={tmp_path / 'curated'}", f"paths.splits={tmp_path / 'data' / 'splits.csv'}"]))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["keep.txt", "splits.csv"]
    assert len(pd.read_csv(tmp_path / "data" / "splits.csv")) == len(_index())


def test_too_few_patients():
    with pytest.raises(CovidXrayError, match="too few patients"):
        make_splits(_index(6), 0.2, 5, seed=0)


def test_each_collection_of_a_class_is_in_test_and_every_fold():
    """Stratified by (class, collection): whichever collections train a model, each has test images
    and images in every fold."""
    index = _index(90)
    index["source"] = np.where(index["patient_id"].str[1:].astype(int) % 2 == 0, "a", "b")
    splits = make_splits(index, test_fraction=0.2, folds=3, seed=0).merge(index[["image_id", "source"]])
    for (label, source), rows in splits.groupby(["label", "source"]):
        assert (rows["partition"] == "test").any(), (label, source)
        assert set(rows.loc[rows["partition"] == "cv", "fold"]) == {0, 1, 2}, (label, source)
