"""Training algorithms: how the head's loss is formed, chosen by config (`algorithm.name`, the
group conf/algorithm/). Each module of this package defines one `Algorithm` subclass with its
NAME and hyper-parameters (dataclass fields, checked on construction); `build` finds it by name,
so adding an algorithm is one module here plus one conf/algorithm/<name>.yaml. An algorithm kept
outside the project registers the same way from its own package, under the entry-point group
`covidxray.algorithms` (name = module:Class).

The stacked-heads trainer (training/stacked_heads.py) hands an algorithm, per step and head, each
row's cross-entropy, its sample weight, its group (class x collection: the domain label
domain-generalization methods need) and the head's hidden representation; the algorithm returns
the per-head loss (Algorithm.loss). A method that changes the rows before the forward pass (mixup)
or needs each row's class (alignment within a class) overrides Algorithm.objective instead, which
gets the batch's rows and the forward pass. Modules import TensorFlow inside their methods, so the catalogue can be read
(and configs checked) before TensorFlow loads.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from covidxray import CovidXrayError
from covidxray.training.algorithms.base import Algorithm

ENTRY_POINTS = "covidxray.algorithms"  # algorithms of other packages: name = module:Class


def catalogue() -> dict[str, type[Algorithm]]:
    """{NAME: class} of every algorithm module of this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for item in vars(module).values():
            if isinstance(item, type) and issubclass(item, Algorithm) and item is not Algorithm:
                found[item.NAME] = item
    for point in entry_points(group=ENTRY_POINTS):
        item = point.load()
        if not (isinstance(item, type) and issubclass(item, Algorithm)):
            raise CovidXrayError(f"entry point {point.name} = {point.value}: not a covidxray Algorithm class")
        found[item.NAME] = item
    return dict(sorted(found.items()))


def build(name: str, params: dict | None = None) -> Algorithm:
    """The algorithm `name` with its hyper-parameters; one-line errors naming the key and the
    allowed values for an unknown name or parameter, or a bad value."""
    known = catalogue()
    if name not in known:
        raise CovidXrayError(f"algorithm.name must be one of {', '.join(known)}, got {name!r}")
    cls = known[name]
    params = dict(params or {})
    allowed = cls.parameter_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CovidXrayError(
            f"algorithm.{unknown[0]}: not a parameter of {name} (its parameters: {', '.join(allowed) or 'none'})"
        )
    return cls(**params)
