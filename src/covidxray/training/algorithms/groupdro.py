"""Group distributionally robust optimization (Sagawa et al., ICLR 2020; DomainBed's GroupDRO):
minimize the worst group's risk through online group weights q, per head, over the class x
collection groups. Each step, q_g <- q_g * exp(eta * risk_g) for the groups in the batch (a group
absent from it keeps its weight), q is normalized, and the loss is sum_g q_g risk_g, risk_g the
group's weighted mean cross-entropy in the batch (Sagawa et al.'s online algorithm, without the
generalization adjustment)."""

from __future__ import annotations

import dataclasses

import numpy as np

from covidxray.training.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class GroupDRO(Algorithm):
    NAME = "groupdro"
    USES_GROUPS = True
    eta: float = 0.01  # step size of the group weights (DomainBed's groupdro_eta)

    def __post_init__(self):
        self._check("eta", self.eta)

    def initial_state(self, n_heads: int, n_groups: int) -> list:
        """q: (heads, groups) group weights, uniform at the start."""
        import tensorflow as tf

        return [tf.Variable(np.full((n_heads, n_groups), 1.0 / n_groups, np.float32), trainable=False)]

    def loss(self, ce, weight, group, hidden, state, n_groups: int):
        import tensorflow as tf

        risks, present = self.group_risks(ce, weight, group, n_groups)
        q = state[0] * tf.exp(self.eta * tf.stop_gradient(risks) * present)
        q = q / tf.reduce_sum(q, axis=1, keepdims=True)
        state[0].assign(q)
        return tf.reduce_sum(tf.stop_gradient(q) * risks, axis=1)
