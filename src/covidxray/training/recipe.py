"""The training recipe, written once: cross-validate -> threshold on the out-of-fold predictions
-> epochs -> final model.

The train stage, leave-one-collection-out (evaluation/loco.py), sweeps and studies all call
`run_recipe`, so the figure LOCO reports is the figure of the recipe the train stage ships. What
differs between callers comes in as arguments: the rows to train on (a LOCO group's remaining
collections, or every training image), the threshold rule (evaluation's `choose_threshold` with
the configured method), and where the train stage records its folds (`open_run`: one nested
MLflow run per fold; `final_run`: the parent run). LOCO passes no runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidxray.training.trainer import FitResult, Trainer


@dataclass
class RecipeResult:
    """What one run of the recipe gives.

    oof: (N, K) softmax outputs of each trainer row in its own validation fold (NaN: a row that was
    not validated: not among `idx`, or in a fold not run); folds: the fold labels run, with
    fitted[i] = (validation probabilities, FitResult) of fold folds[i] and splits[i] its (train,
    validation) rows; threshold: chosen on the OOF rows; epochs: the final model's epochs per phase;
    model: the final model (None when not asked for) and final: its FitResult."""

    oof: np.ndarray
    folds: list
    splits: list
    fitted: list
    threshold: float
    epochs: list[int]
    model: object = None
    final: FitResult | None = None

    @property
    def validated(self) -> np.ndarray:
        """The trainer rows with an out-of-fold prediction, in row order."""
        return np.sort(np.concatenate([val for _, val in self.splits]))

    @property
    def best_epochs(self) -> pd.DataFrame:
        """Per fold run: best_epoch (and best_epoch_fine_tune when fine-tuning)."""
        names = ("best_epoch", "best_epoch_fine_tune")
        return pd.DataFrame([dict(zip(names, map(float, r.best_epochs))) for _, r in self.fitted])


def cv_splits(idx: np.ndarray, fold_of: np.ndarray, folds: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, validation rows) per fold k: validate on the rows of `idx` in fold k, train
    on every other row of `idx` (rows of folds not run included)."""
    idx = np.asarray(idx)
    return [(idx[fold_of[idx] != k], idx[fold_of[idx] == k]) for k in folds]


def final_epochs(configured: list[int], best: pd.DataFrame, early_stopping: bool) -> list[int]:
    """The final model's epochs per phase: with early stopping, the CV's median best epoch
    (rounded up, at least 1; likewise for fine-tuning), since it has no validation fold to stop
    on; without, the configured ones."""
    epochs = list(configured)
    if early_stopping:
        epochs[0] = max(1, int(math.ceil(np.median(best["best_epoch"]))))
        if "best_epoch_fine_tune" in best:
            epochs[1] = max(1, int(math.ceil(np.median(best["best_epoch_fine_tune"]))))
    return epochs


def cross_validate(
    trainer: Trainer,
    idx: np.ndarray,
    fold_of: np.ndarray,
    folds: list,
    positive: np.ndarray,
    threshold_rule: Callable[[np.ndarray, np.ndarray], float],
    open_run: Callable | None = None,
) -> RecipeResult:
    """The recipe's first half on rows `idx` of the trainer: one model per fold of `folds`
    (trainer.cross_validate; open_run(fold), when given, returns the MLflow run a fold logs to),
    threshold_rule(positive, covid score) on the out-of-fold rows, and the final model's epochs
    from the folds' best epochs (the trainer settings' early_stopping)."""
    s = trainer.settings
    epochs = [s.epochs, s.model.fine_tune.epochs if trainer.fine_tunes else 0]
    splits = cv_splits(idx, fold_of, folds)
    fitted = trainer.cross_validate(splits, epochs, labels=folds, open_run=open_run)
    oof = np.full((len(trainer.y), trainer.n_classes), np.nan)
    for (_, val), (probs, _) in zip(splits, fitted, strict=True):
        oof[val] = probs
    result = RecipeResult(oof, list(folds), splits, fitted, float("nan"), epochs)
    done = result.validated
    result.threshold = float(threshold_rule(positive[done], oof[done, -1]))
    result.epochs = final_epochs(epochs, result.best_epochs, s.early_stopping)
    return result


def fit_final(trainer: Trainer, idx: np.ndarray, result: RecipeResult, run_id: str | None = None) -> RecipeResult:
    """The recipe's second half: the final model on all rows `idx` for result.epochs (no validation
    fold, so no early stopping), its per-epoch figures logged to `run_id` with the prefix final_."""
    result.model = trainer.new_model()
    result.final = trainer.fit(
        result.model, np.asarray(idx), None, result.epochs, run_id=run_id, fold_label="final", log_prefix="final_"
    )
    return result


def run_recipe(
    trainer: Trainer,
    idx: np.ndarray,
    fold_of: np.ndarray,
    folds: list,
    positive: np.ndarray,
    threshold_rule: Callable[[np.ndarray, np.ndarray], float],
) -> RecipeResult:
    """The whole recipe on rows `idx`, logging nowhere: cross_validate, then fit_final."""
    return fit_final(trainer, idx, cross_validate(trainer, idx, fold_of, folds, positive, threshold_rule))
