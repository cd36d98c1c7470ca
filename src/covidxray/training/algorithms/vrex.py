"""Risk extrapolation, V-REx (Krueger et al., ICML 2021; DomainBed's VREx): the mean of the
per-group risks plus `penalty` times their variance, the penalty weight 1.0 for the first
`anneal_steps` optimizer steps and `penalty` after (DomainBed's warm-up; unlike DomainBed the
trainer's Adam is not reset at the switch).

Environments are the class x collection groups present in the batch; a group's risk is its rows'
weighted mean cross-entropy. Equalizing risks aligns no features, so it cannot erase the label;
but where each class comes from one collection (this project's LOCO training sets) the groups are
the classes and the variance is between the classes' risks, not between sites."""

from __future__ import annotations

import dataclasses

from covidxray.training.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class VREx(Algorithm):
    NAME = "vrex"
    USES_GROUPS = True
    penalty: float = 10.0  # DomainBed's vrex_lambda
    anneal_steps: int = 500  # DomainBed's vrex_penalty_anneal_iters: steps at weight 1.0 first

    def __post_init__(self):
        self._check("penalty", self.penalty)
        self._check_integer("anneal_steps", self.anneal_steps)

    def initial_state(self, n_heads: int, n_groups: int) -> list:
        """The optimizer steps taken so far."""
        import tensorflow as tf

        return [tf.Variable(0, dtype=tf.int64, trainable=False)]

    def loss(self, ce, weight, group, hidden, state, n_groups: int):
        import tensorflow as tf

        risks, present = self.group_risks(ce, weight, group, n_groups)
        count = tf.reduce_sum(present, axis=1)
        mean = tf.reduce_sum(risks * present, axis=1) / count
        variance = tf.reduce_sum(present * tf.square(risks - mean[:, None]), axis=1) / count
        factor = tf.where(state[0] >= self.anneal_steps, float(self.penalty), 1.0)
        state[0].assign_add(1)
        return mean + factor * variance
