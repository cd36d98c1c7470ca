"""Inter-domain mixup (Yan et al. 2020; Xu et al. 2020; DomainBed's Mixup): each row is mixed with
a partner row of another domain, x = lam * x_i + (1 - lam) * x_j with lam ~ Beta(alpha, alpha)
(one lam per step and head, as DomainBed draws one per pair of minibatches), and the loss is
lam * ce(y_i) + (1 - lam) * ce(y_j) on the mixed input (each term with its row's class weight),
summed over the batch over its size.

Domains are the class x collection groups. With pairs=within_class (the default) the partner has
the same class and another collection: here most collections hold one class, and mixing across
classes would mix ieee8023 covid with kermany normal, whose soft label the collection explains as
well as the image does; within a class, the mixed image carries both collections' traits under
one label, so the traits cannot predict it. A row whose class has no other collection in the batch
is not mixed (lam = 1). pairs=all takes a partner from any other group (DomainBed's pairs of
domains). The partner of row i: among its candidates, the next after it in a random cyclic order."""

from __future__ import annotations

import dataclasses

import numpy as np

from covidxray.training.algorithms.base import Algorithm

PAIRS = ("within_class", "all")


@dataclasses.dataclass(frozen=True)
class Mixup(Algorithm):
    NAME = "mixup"
    USES_GROUPS = True
    alpha: float = 0.2  # Beta(alpha, alpha) of the mixing weight (DomainBed's mixup_alpha)
    pairs: str = "within_class"  # the partner's group: within_class (same class, other collection) | all

    def __post_init__(self):
        self._check("alpha", self.alpha, low_open=True)
        self._check_choice("pairs", self.pairs, PAIRS)

    def draws(self, rng, steps: int, batch: int):
        """(steps, batch, 2): each row's place in the random cyclic order, and lam (one per step)."""
        order = rng.random((steps, batch))
        lam = np.repeat(rng.beta(self.alpha, self.alpha, size=(steps, 1)), batch, axis=1)
        return np.stack([order, lam], axis=-1)

    def partners(self, onehot, group, order):
        """(K, B) each row's partner and (K, B) whether it has one (see the module's docstring)."""
        import tensorflow as tf

        candidate = group[:, :, None] != group[:, None, :]  # (K, i, j)
        if self.pairs == "within_class":
            label = tf.argmax(onehot, axis=-1)
            candidate &= label[:, :, None] == label[:, None, :]
        gap = tf.math.floormod(order[:, None, :] - order[:, :, None], 1.0)
        gap = tf.where(candidate, gap, 2.0)
        return tf.argmin(gap, axis=-1, output_type=tf.int32), tf.reduce_any(candidate, axis=-1)

    def objective(self, forward, x, onehot, weight, group, draws, state, n_groups: int):
        import tensorflow as tf

        partner, paired = self.partners(onehot, group, draws[..., 0])
        lam = tf.where(paired, draws[..., 1], 1.0)  # (K, B)
        mixed = lam[..., None] * x + (1.0 - lam[..., None]) * tf.gather(x, partner, batch_dims=1)
        p, _ = forward(mixed)
        own = weight * self.cross_entropy(onehot, p)
        other = tf.gather(weight, partner, batch_dims=1) * self.cross_entropy(
            tf.gather(onehot, partner, batch_dims=1), p
        )
        per_row = lam * own + (1.0 - lam) * other
        return p, tf.reduce_sum(per_row, axis=1) / tf.cast(tf.shape(per_row)[1], per_row.dtype)
