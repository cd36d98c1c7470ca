"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops; DomainBed's CORAL): the weighted cross-entropy
plus `gamma` times the mean, over pairs of groups, of the squared differences of the means and of
the covariances of the head's hidden representation (each averaged over its entries), per batch.

Pairs: here most collections hold one class (ieee8023: covid; kermany: normal), so aligning whole
collections aligns covid with normal and erases the label. With pairs=within_class (the default)
only groups of the same class from different collections are aligned (covid of ieee8023 with
covid of radiography...); pairs=all aligns every pair of class x collection groups, DomainBed's
every pair of domains (kept to show that harm). A group needs 2 rows in the batch to take part."""

from __future__ import annotations

import dataclasses

from covidxray.training.algorithms.base import Algorithm

PAIRS = ("within_class", "all")


@dataclasses.dataclass(frozen=True)
class CORAL(Algorithm):
    NAME = "coral"
    USES_GROUPS = True
    gamma: float = 1.0  # penalty weight (DomainBed's mmd_gamma)
    pairs: str = "within_class"  # which groups are aligned: within_class | all

    def __post_init__(self):
        self._check("gamma", self.gamma)
        self._check_choice("pairs", self.pairs, PAIRS)

    def objective(self, forward, x, onehot, weight, group, draws, state, n_groups: int):
        p, hidden = forward(x)
        ce = self.cross_entropy(onehot, p)
        return p, self.weighted_mean(ce, weight) + self.gamma * self.penalty(hidden, onehot, group, n_groups)

    def penalty(self, hidden, onehot, group, n_groups: int):
        """(K,) the mean over aligned pairs of groups of mean_diff + cov_diff (DomainBed's
        CORAL.coral: covariances with n - 1, squared differences averaged over entries)."""
        import tensorflow as tf

        member = tf.one_hot(group, n_groups, dtype=hidden.dtype)  # (K, B, G)
        n = tf.reduce_sum(member, axis=1)  # (K, G)
        mean = tf.einsum("kbg,kbh->kgh", member, hidden) / tf.maximum(n, 1.0)[..., None]
        centred = (hidden[:, None] - mean[:, :, None]) * tf.transpose(member, [0, 2, 1])[..., None]  # (K, G, B, H)
        cov = tf.einsum("kgbh,kgbi->kghi", centred, centred) / tf.maximum(n - 1.0, 1.0)[..., None, None]
        mean_diff = tf.reduce_mean(tf.square(mean[:, :, None] - mean[:, None]), axis=-1)  # (K, G, G)
        cov_diff = tf.reduce_mean(tf.square(cov[:, :, None] - cov[:, None]), axis=[-2, -1])
        ready = tf.cast(n >= 2, hidden.dtype)
        pair = ready[:, :, None] * ready[:, None, :] * tf.linalg.band_part(tf.ones_like(mean_diff), 0, -1)
        pair -= tf.linalg.band_part(pair, 0, 0)  # groups g < j
        if self.pairs == "within_class":
            classes = tf.cast(tf.einsum("kbg,kbc->kgc", member, onehot) > 0, hidden.dtype)  # (K, G, C)
            pair *= tf.cast(tf.einsum("kgc,kjc->kgj", classes, classes) > 0, hidden.dtype)
        total = tf.reduce_sum(pair * (mean_diff + cov_diff), axis=[1, 2])
        return tf.math.divide_no_nan(total, tf.reduce_sum(pair, axis=[1, 2]))
