"""What every training algorithm supplies to the stacked-heads trainer (see __init__.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from covidxray import CovidXrayError


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A training algorithm: the per-head loss of a batch.

    `loss` runs inside the trainer's compiled epoch (TensorFlow ops only). Its arguments, for K
    heads trained together and batches of B rows: ce (K, B) each row's cross-entropy; weight (K, B)
    its sample weight (class weights); group (K, B) int32, its class x collection group in
    [0, n_groups); hidden (K, B, H) the head's representation before its output layer (the pooled
    features themselves for a linear head); state: the variables of `initial_state`, updated in
    place where the method keeps state (GroupDRO's group weights). Returns (K,) losses."""

    NAME: ClassVar[str] = ""
    USES_GROUPS: ClassVar[bool] = False  # needs the collection of each row (domain generalization)

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def initial_state(self, n_heads: int, n_groups: int) -> list:
        """The variables the method updates across steps (none by default)."""
        return []

    def loss(self, ce, weight, group, hidden, state, n_groups: int):
        raise NotImplementedError

    def keras_loss(self):
        """The loss for Keras's `fit` (a model trained from pixels: augmentation, fine-tuning), or
        None where the method needs the stacked-heads trainer (frozen base, no augmentation)."""
        return None

    @staticmethod
    def weighted_mean(ce, weight):
        """ERM's loss: the class-weighted cross-entropy summed over the batch, over its size
        (Keras's sum-over-batch-size reduction)."""
        import tensorflow as tf

        return tf.reduce_sum(ce * weight, axis=1) / tf.cast(tf.shape(ce)[1], ce.dtype)

    def _check(self, key: str, value, low: float = 0.0, low_open: bool = False) -> None:
        """A numeric hyper-parameter in [low, inf) (or (low, inf)), else a one-line error."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (low_open and value == low):
            bound = f"> {low}" if low_open else f">= {low}"
            raise CovidXrayError(f"algorithm.{key} must be a number {bound} for {self.NAME}, got {value!r}")
