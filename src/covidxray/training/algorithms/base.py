"""What every training algorithm supplies to the stacked-heads trainer (see __init__.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from covidxray import CovidXrayError

EPSILON = 1e-7  # Keras's clip for cross-entropy of probabilities


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

    def draws(self, rng, steps: int, batch: int):
        """Random numbers one head's epoch needs beyond its batches and dropout (mixup's partners
        and mixing weights), drawn on the host from a child of the head's random stream, so its
        batches and dropout stay ERM's: (steps, batch, m) floats, or None (the default)."""
        return None

    def objective(self, forward, x, onehot, weight, group, draws, state, n_groups: int):
        """One step's (softmax outputs (K, B, C), per-head losses (K,)), from the batch's rows
        before the forward pass: x (K, B, D) pooled features, onehot (K, B, C) targets, weight,
        group, draws (K, B, m) (see `draws`); forward(x) gives (softmax outputs, hidden).

        The default is the forward pass on the rows as drawn, each row's cross-entropy, then
        `loss`: a method that only forms the loss overrides `loss`; one that changes the rows
        before the forward pass (mixup) or needs each row's class (alignment within a class)
        overrides this."""
        p, hidden = forward(x)
        return p, self.loss(self.cross_entropy(onehot, p), weight, group, hidden, state, n_groups)

    @staticmethod
    def cross_entropy(onehot, p):
        """Each row's cross-entropy of softmax outputs p against targets (Keras's clip at EPSILON)."""
        import tensorflow as tf

        return -tf.reduce_sum(onehot * tf.math.log(tf.clip_by_value(p, EPSILON, 1 - EPSILON)), axis=-1)

    @staticmethod
    def group_risks(ce, weight, group, n_groups: int):
        """Per head and group, the weighted mean cross-entropy of the group's rows in the batch
        (K, G), and (K, G) 1.0 where the group has rows in the batch, 0.0 where it has none."""
        import tensorflow as tf

        member = tf.one_hot(group, n_groups, dtype=ce.dtype) * weight[..., None]  # (K, B, G)
        mass = tf.reduce_sum(member, axis=1)
        risks = tf.math.divide_no_nan(tf.einsum("kbg,kb->kg", member, ce), mass)
        return risks, tf.cast(mass > 0, ce.dtype)

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

    def _check_integer(self, key: str, value, low: int = 0) -> None:
        """An integer hyper-parameter >= low, else a one-line error."""
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CovidXrayError(f"algorithm.{key} must be an integer >= {low} for {self.NAME}, got {value!r}")

    def _check_choice(self, key: str, value, allowed: tuple[str, ...]) -> None:
        """A hyper-parameter among `allowed`, else a one-line error."""
        if value not in allowed:
            raise CovidXrayError(f"algorithm.{key} must be one of {', '.join(allowed)} for {self.NAME}, got {value!r}")
