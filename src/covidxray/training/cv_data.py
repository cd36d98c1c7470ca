"""What the train stage and leave-one-collection-out share: the curated images of a set of
training collections with their CV folds (CVData) and the Trainer made for them (the recipe they
both run is recipe.py). Library code: takes values (paths, roles, FitSettings), never the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.infra import config
from covidxray.training.trainer import Trainer
from covidxray.training.specs import FitSettings


@dataclass
class CVData:
    """The non-test images (uint8 (N, S, S)) with their rows, classes, and fold numbers."""

    images: np.ndarray
    rows: pd.DataFrame  # image_id, patient_id, label, y, source (the collection), fold
    classes: list[str]
    folds: list[int]
    store_size: int  # the side of the curated images they were made from (what prediction resizes to first)

    @property
    def y(self) -> np.ndarray:
        return self.rows["y"].to_numpy().astype(int)

    @property
    def groups(self) -> np.ndarray:
        """Each row's class x collection group, 0..G-1: the domain label that domain-generalization
        algorithms balance or align (collections by name; the class alone without a source column)."""
        if "source" not in self.rows:
            return self.y
        codes, _ = pd.factorize(self.rows["source"].astype(str), sort=True)
        return self.y * (int(codes.max()) + 1) + codes


def load_cv_data(
    curated: Path,
    splits: Path,
    inputs: dict,
    roles: dict,
    balance: str = "none",
    seed: int = 0,
    folds: int | None = None,
    task: str | None = None,
) -> CVData:
    """The curated images of the CV partition of the training collections (`roles["train"]`),
    balanced as asked, joined with their folds (the first `folds`, or all), as model inputs
    (`inputs`: images.input_spec); the test partition and the external collections are dropped
    here and never seen by training. With `task`, the curated classes must be that task's."""
    from covidxray.data import collections, sources
    from covidxray.data.images import load_curated, load_splits, prepare, with_splits

    images, index, classes = load_curated(curated)
    if task is not None and list(classes) != list(collections.TASKS[task]):
        raise CovidXrayError(
            f"data.task={task} but the curated data in {curated} holds the classes {', '.join(classes)}: "
            f"re-run curate (`dvc repro curate`) or set data.task to the task it was curated for"
        )
    sources.check_present({"train": roles["train"]}, index, curated)
    joined = with_splits(index[["image_id", "patient_id", "label", "y", "source"]], load_splits(splits), splits)
    chosen = joined[(joined["partition"] == "cv").to_numpy() & sources.in_role(joined, roles["train"])]
    keep = sources.balance(chosen, balance, seed).index.to_numpy()
    rows = joined.iloc[keep].drop(columns=["partition"]).reset_index(drop=True)
    rows["fold"] = rows["fold"].astype(int)
    found = sorted(rows["fold"].unique().tolist())
    if len(found) < 2 or found != list(range(len(found))):
        raise CovidXrayError(f"{splits}: CV folds must be 0..K-1 with K >= 2, found {found}")
    if folds is not None:
        if folds > len(found):
            config.fail("cv.folds", f"all or an integer in [2, {len(found)}] (the folds in {splits})", folds)
        found = found[:folds]
    y = rows["y"].to_numpy()
    if len(classes) < 2 or y.min() < 0 or y.max() >= len(classes):
        raise CovidXrayError(f"curated labels y must index the classes {classes}")
    for k in found:
        present = set(rows.loc[rows["fold"] == k, "y"])
        if len(present) < 2:
            raise CovidXrayError(f"CV fold {k} holds only class {sorted(present)}: cannot validate on it")
    pixels = prepare(images[keep], inputs["image_size"], inputs["normalize"], inputs["crop_border"])
    return CVData(pixels, rows, list(classes), found, int(images.shape[1]))


def make_trainer(fit: FitSettings, data: CVData, deterministic: bool = False, log_prefix: str = "train") -> Trainer:
    """The Trainer of these fit settings on `data`, after the checks that need TensorFlow: the
    ImageNet file (fail now, not after the first fold, when offline), op determinism when asked for."""
    import tensorflow as tf

    from covidxray.networks import builders

    model = fit.model
    if model.weights == "imagenet":
        builders.check_imagenet(model.name, fit.image_size, model.imagenet_file)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    trainer = Trainer(fit, data.images, data.y, len(data.classes), groups=data.groups)
    print(
        f"{log_prefix}: {model.name} ({model.weights}, {'frozen' if model.freeze_base else 'trainable'} base), "
        f"{len(data.images)} images at {fit.image_size} px, folds {data.folds}, augment "
        f"{fit.augment.name}, feature cache {'on' if trainer.uses_cache else 'off'}, "
        f"{trainer.strategy.num_replicas_in_sync} replica(s)"
    )
    return trainer
