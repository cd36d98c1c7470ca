"""Empirical risk minimization: the class-weighted cross-entropy (the project's default, and the
baseline every domain-generalization method is compared with; Vapnik 1998, as in DomainBed)."""

from __future__ import annotations

import dataclasses

from covidxray.training.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class ERM(Algorithm):
    NAME = "erm"

    def loss(self, ce, weight, group, hidden, state, n_groups: int):
        return self.weighted_mean(ce, weight)

    def keras_loss(self):
        return "categorical_crossentropy"  # with Keras's class weights: the same weighted mean
