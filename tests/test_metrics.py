"""metrics: hand-computed figures, the patient-level bootstrap, and the threshold choice."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from covidxray import CovidXrayError
from covidxray.evaluation import metrics as M

ALL_METRICS = ("accuracy",) + M.BINARY_METRICS  # what classification_metrics returns


def _binary(scores):
    s = np.asarray(scores, dtype=float)
    return np.c_[1 - s, s]


def _point(y, scores, threshold=0.5):
    """Point estimates as plain floats (None where undefined)."""
    out = M.classification_metrics(y, _binary(scores), threshold)
    return {k: (None if np.isnan(v[0]) else float(v[0])) for k, v in out.items()}


def test_hand_computed_example():
    # y: 0 0 1 1, scores .1 .4 .35 .8 -> at 0.5: TP 1, FN 1, FP 0, TN 2
    m = _point([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["ppv"] == pytest.approx(1.0)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # 10 equal-width bins, one score each: |0-.1| + |0-.4| + |1-.35| + |1-.8| over 4
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)


def test_perfect_classifier():
    m = _point([0, 0, 1, 1, 1], [0.0, 0.0, 1.0, 1.0, 1.0])
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc", "pr_auc"):
        assert m[key] == pytest.approx(1.0), key
    assert m["brier"] == pytest.approx(0.0)
    assert m["ece"] == pytest.approx(0.0)


def test_constant_classifier():
    # everything at 0.5, threshold 0.5: all called positive
    m = _point([0, 0, 1, 1], [0.5] * 4)
    assert m["auc"] == pytest.approx(0.5)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0
    assert m["ppv"] == pytest.approx(0.5)
    assert m["npv"] is None  # no negative calls: undefined, not 0
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["pr_auc"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx(0.25)
    assert m["ece"] == pytest.approx(0.0)  # perfectly calibrated, useless


def test_weighted_ranking_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(10):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.random(40), 1)  # many ties
        w = rng.integers(0, 3, (4, 40)).astype(float)
        m = M.weighted_binary_metrics(y, s, s >= 0.5, w)
        for b in range(4):
            if len(set(y[w[b] > 0])) < 2:
                continue
            assert m["auc"][b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]))
            assert m["pr_auc"][b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]))
            assert m["brier"][b] == pytest.approx(brier_score_loss(y, s, sample_weight=w[b]))


def test_three_class_per_class_and_macro():
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4]]
    )
    out = M.classification_metrics(y, probs, threshold=0.5)
    pred = M.decide(probs, 0.5)
    # covid (2) iff p >= .5, else argmax of the others: row 3 (p=.4) -> normal, row 5 (p=.4) -> normal
    assert pred.tolist() == [0, 1, 2, 0, 0, 0]
    assert out["accuracy"][0] == pytest.approx(4 / 6)  # rows 0, 1, 2, 5
    assert set(out["per_class"]) == {0, 1, 2}
    assert out["per_class"][1]["sensitivity"][0] == pytest.approx(0.5)
    assert out["sensitivity"][0] == pytest.approx(out["per_class"][2]["sensitivity"][0])
    macro = np.mean([out["per_class"][c]["auc"][0] for c in range(3)])
    assert out["macro"]["auc"][0] == pytest.approx(macro)


# -- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    p = np.clip(0.35 * y + rng.random(100) * 0.65, 0, 1)
    patients = np.arange(100) // 2
    res = M.bootstrap_metrics(y, _binary(p), 0.5, patients, n_resamples=500, ci=0.95, seed=1)
    for key in ALL_METRICS:
        assert res[f"{key}_ci_low"] <= res[key] <= res[f"{key}_ci_high"], key
    assert res["auc_ci_high"] - res["auc_ci_low"] > 0.01
    again = M.bootstrap_metrics(y, _binary(p), 0.5, patients, n_resamples=500, ci=0.95, seed=1)
    assert again == res  # seeded


def test_bootstrap_resamples_patients_not_images():
    ids = np.array(["big"] * 10 + [f"p{i}" for i in range(5)])
    w = M.patient_bootstrap_weights(ids, n_resamples=300, seed=0)
    assert w.shape == (300, 15)
    assert (w[:, :10] == w[:, [0]]).all()  # the big patient's images move together
    n_drawn = w[:, 0] + w[:, 10:].sum(axis=1)  # draws per resample = number of patients
    assert (n_drawn == 6).all()

    # One patient with 20 misclassified images, 20 patients with one correct image each.
    y = np.ones(40, dtype=int)
    scores = np.r_[np.zeros(20), np.ones(20)]
    patients = np.r_[["A"] * 20, [f"q{i}" for i in range(20)]]
    boot = M.classification_metrics(
        y, _binary(scores), 0.5, weights=M.patient_bootstrap_weights(patients, 2000, seed=3)
    )
    acc = boot["accuracy"]
    # A is left out of a resample with probability (20/21)^21 ~ 0.36: accuracy is then exactly 1;
    # resampling images instead would almost never give 1 (each image is wrong with prob 1/2).
    assert 0.28 < np.mean(acc == 1.0) < 0.44
    res = M.bootstrap_metrics(y, _binary(scores), 0.5, patients, n_resamples=2000, seed=3)
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["accuracy_ci_high"] == pytest.approx(1.0)


def test_bootstrap_skips_one_class_resamples_for_auc():
    # one covid patient among 5: many resamples lack a positive, AUC/sensitivity undefined there
    y = np.array([1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.1, 0.7, 0.3])
    patients = ["c", "c", "n1", "n2", "n3", "n4"]
    res = M.bootstrap_metrics(y, _binary(p), 0.5, patients, n_resamples=400, seed=0)
    assert 0 < res["auc_n_resamples"] < 400
    assert np.isfinite(res["auc_ci_low"]) and np.isfinite(res["auc_ci_high"])
    assert "accuracy_n_resamples" not in res  # defined on every resample


# -- threshold ----------------------------------------------------------------------------------


def test_youden_threshold():
    # J at 0.8: .5 - 0 ; at 0.4: .5 - .5 ; at 0.35: 1 - .5 ; ties: the higher threshold
    assert M.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    assert M.choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9]) == pytest.approx(0.6)


def test_youden_ties_break_towards_the_threshold_in_use():
    """Few images (a site's calibration set): J = .5 at 0.9992 and at 0.2. Without a preference the
    highest wins; with the transferred threshold, it is kept where it ties, else the nearest tie."""
    y, s = [0, 0, 1, 1], [0.1, 0.5, 0.2, 0.9992]
    assert M.choose_threshold(y, s) == pytest.approx(0.9992)
    assert M.choose_threshold(y, s, prefer=0.3) == pytest.approx(0.2)  # J(0.3) = 0: the nearest tie
    assert M.choose_threshold(y, s, prefer=0.15) == pytest.approx(0.15)  # J(0.15) = .5 too
    assert M.choose_threshold(y, s, prefer=0.05) == pytest.approx(0.2)  # J(0.05) = 0
    assert M.choose_threshold(y, s, prefer=0.95) == pytest.approx(0.95)  # J(0.95) = .5: kept
    assert M.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], prefer=0.36) == pytest.approx(0.35)  # no tie
    from covidxray.evaluation.calibration import site_threshold

    y, s = np.r_[np.zeros(5), np.ones(5)], np.r_[0.1, 0.2, 0.3, 0.6, 0.7, 0.25, 0.4, 0.5, 0.9, 0.9992]
    assert site_threshold(y, s, "youden", 0.9) == pytest.approx(0.9)  # J .4 at 0.9 and 0.4
    assert site_threshold(y, s, "youden", 0.9, prefer=0.45) == pytest.approx(0.4)


def test_sensitivity_threshold():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert M.choose_threshold(y, s, "sensitivity", 0.95) == pytest.approx(0.35)
    assert M.choose_threshold(y, s, "sensitivity", 0.5) == pytest.approx(0.8)
    y = np.r_[np.zeros(50), np.ones(100)]
    s = np.r_[np.linspace(0, 0.5, 50), np.linspace(0.01, 1, 100)]
    t = M.choose_threshold(y, s, "sensitivity", 0.95)
    assert np.mean(s[y == 1] >= t) >= 0.95
    assert np.mean(s[y == 1] > t) < 0.95  # the highest threshold that still reaches it


def test_threshold_errors():
    with pytest.raises(CovidXrayError, match="both"):
        M.choose_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(CovidXrayError, match="NaN"):
        M.choose_threshold([0, 1], [0.2, float("nan")])
    # the method and target are settings' to check (test_config: train.threshold, train.target_sensitivity)


def test_decide_uses_threshold_inclusively():
    probs = _binary([0.29, 0.3, 0.31])
    assert M.decide(probs, 0.3).tolist() == [0, 1, 1]


def test_curves_tables():
    tables = M.curves([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], n_bins=10)
    assert list(tables["roc"].columns[:2]) == ["fpr", "tpr"]
    assert list(tables["precision_recall"].columns[:2]) == ["recall", "precision"]
    cal = tables["calibration"]
    assert cal["count"].sum() == 4 and set(cal["bin"]) == {1, 3, 4, 8}
