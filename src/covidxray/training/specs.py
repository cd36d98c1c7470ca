"""What one model is built and fitted from: frozen values that settings/train.py checks and builds from
the `model`, `optimizer`, `augment` and `train` groups, and that models, inputs and fitting read."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Head:
    """model.head: AveragePooling2D, then (type mlp) Dense (ReLU) and Dropout before the softmax,
    or (type linear) Dropout on the pooled features before it; l2: the Dense kernels' L2 penalty;
    standardize: the head trains on features standardized by its training rows' mean and std
    (folded into its first Dense layer: stacked_heads.fold_standardization)."""

    pool_size: int
    dense_units: int
    dropout: float
    type: str = "mlp"
    l2: float = 0.0
    standardize: bool = False


@dataclass(frozen=True)
class FineTune:
    """model.fine_tune: the optional second phase with the top of a frozen base unfrozen."""

    unfreeze_top: int  # 0: no second phase
    epochs: int
    lr_factor: float


@dataclass(frozen=True)
class ModelSettings:
    """The `model` group: backbone, weights and head (models.build_model's input)."""

    name: str
    weights: str  # imagenet | none | a weights file
    freeze_base: bool
    filters: tuple[int, ...]
    head: Head
    fine_tune: FineTune
    imagenet_file: str | None = None  # converted ImageNet weights (the pretrained stage), e.g. efficientnet_lite0's
    features: str = "last"  # catalogue.FEATURE_SOURCES: what the head gets from the backbone

    def as_config(self) -> dict:
        """The nested mapping models.build_model reads."""
        return asdict(self)


@dataclass(frozen=True)
class OptimizerSettings:
    """The `optimizer` group."""

    name: str
    lr: float
    schedule: str


@dataclass(frozen=True)
class AugmentSettings:
    """The `augment` group; the amounts are 0 where the chosen kind does not use them."""

    name: str
    rotation_deg: float = 0.0
    shift: float = 0.0
    zoom: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    horizontal_flip: bool = False


@dataclass(frozen=True)
class AlgorithmSettings:
    """The `algorithm` group: the training algorithm's name and hyper-parameters (training/algorithms)."""

    name: str = "erm"
    params: tuple[tuple[str, object], ...] = ()

    def build(self):
        """The Algorithm object (hyper-parameters checked)."""
        from covidxray.training import algorithms

        return algorithms.build(self.name, dict(self.params))


@dataclass(frozen=True)
class FitSettings:
    """How one model is built and fitted: what fitting.Trainer needs."""

    seed: int
    image_size: int
    model: ModelSettings
    optimizer: OptimizerSettings
    augment: AugmentSettings
    epochs: int
    batch_size: int
    steps_per_execution: int
    run_eagerly: bool
    early_stopping: bool
    patience: int
    class_weights: str
    distribute: str
    feature_store: str | None = None  # the feature store's folder (paths.features); None: memory only
    algorithm: AlgorithmSettings = AlgorithmSettings()
