"""MLflow tracking: where runs go, and what every run records about code and data versions.

Default store: SQLite at mlruns/mlflow.db with artifacts under mlruns/artifacts (no server);
MLFLOW_TRACKING_URI (or mlflow.tracking_uri in the config) selects a team server instead.

Runs that end abnormally end as KILLED: an interrupted command (Ctrl-C) ends the runs it opened
(`end_interrupted_runs`, called by the cli), and runs left RUNNING by a process that no longer
exists (SIGKILL, power loss) are recognised by their host/pid tags and ended the next time a
stage configures the store on the same host (`end_orphaned_runs`).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from covidxray.infra.outputs import process_alive, process_start

DEFAULT_STORE = Path("mlruns")
HOST_TAG, PID_TAG, PID_START_TAG = "covidxray.host", "covidxray.pid", "covidxray.pid_start"
_CONFIGURED: set[tuple[str, str]] = set()  # (tracking URI, experiment id) this process logged to


def tracking_uri(configured: str | None = None) -> str:
    """The tracking URI: the config's value, else $MLFLOW_TRACKING_URI, else the local SQLite store."""
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (mlruns/artifacts); a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


# Where a local SQLite store records absolute artifact locations (MLflow resolves every local one
# to an absolute path): rewritten when the store has moved (`follow_moved_store`).
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def use_store(configured_uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at the store (a local one made if needed, and moved
    into place if its checkout moved: follow_moved_store); returns its URI."""
    import mlflow

    uri = tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)  # first: a failed write in follow_moved_store names this store
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        follow_moved_store(uri)
    return uri


def _recorded_store_dir(db: Path) -> Path | None:
    """The folder a local store was made in, as its experiments' artifact locations record it
    (<store folder>/artifacts, _artifact_root, the folder named as the store's is now); None when
    it records no such location."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            rows = conn.execute("SELECT artifact_location FROM experiments").fetchall()
    except sqlite3.Error:  # not made yet, or not an MLflow store
        return None
    for (location,) in rows:
        if location and location.startswith("file://") and location.rstrip("/").endswith("/artifacts"):
            folder = Path(unquote(urlparse(location).path)).parent
            if folder.name == db.parent.name:
                return folder
    return None


def follow_moved_store(uri: str) -> Path | None:
    """A local SQLite store whose checkout was moved or copied still names the old folder in
    every artifact location (experiments, runs, logged models, model versions): new runs would
    log there and registry URIs resolve there, into another checkout. Rewrite those that start
    with the old folder to this one, in one transaction (idempotent). Returns the old folder."""
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///")).resolve()
    old = _recorded_store_dir(db)
    if old is None or old == db.parent:
        return None
    pairs = [(old.as_uri(), db.parent.as_uri()), (str(old), str(db.parent))]  # URIs, and plain paths (experiment 0)
    with sqlite3.connect(db, timeout=60) as conn:
        for table, column in LOCATION_COLUMNS:
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                continue
            for before, after in pairs:
                conn.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ? AND substr({column}, ?, 1) IN ('', '/')",
                    (after, len(before) + 1, len(before), before, len(before) + 1),
                )
    print(f"MLflow: the store {db} was made in {old}; its artifact locations now point beside it", file=sys.stderr)
    return old


def configure(configured_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    uri = use_store(configured_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = mlflow.create_experiment(experiment, artifact_location=_artifact_root(uri))
    mlflow.set_experiment(experiment_id=experiment_id)
    _CONFIGURED.add((uri, experiment_id))
    end_orphaned_runs(experiment_id)
    return experiment_id


# -- what every training run records --------------------------------------------------------------


def flatten_params(cfg, prefix: str = "") -> dict[str, str]:
    """A (resolved) config as MLflow params: dotted keys, scalar values as text, lists as JSON."""
    import json

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}
    for key, value in (cfg or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = "null" if value is None else str(value)
    return out


def git_output(args: list[str], cwd: Path) -> str | None:
    """`git ARGS` run in cwd: its stripped output, or None where git fails (no repository, no git)."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """The code version: commit and whether the work tree differs from it (tracked files)."""
    cwd = Path(cwd or Path.cwd())
    commit = git_output(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"git_commit": "unknown"}
    status = git_output(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "mlflow.source.git.commit": commit,
    }


def data_version_tags(root: Path | None = None) -> dict[str, str]:
    """The pinned data version: the md5s the *.dvc files (data.dvc) record. What a run actually
    read and wrote is tagged after it by content_tags (dvc.lock, read at the start, would describe
    the previous run)."""
    import yaml

    root = Path(root or Path.cwd())
    tags: dict[str, str] = {}
    for dvc_file in sorted(root.glob("*.dvc")):
        try:
            doc = yaml.safe_load(dvc_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for out in doc.get("outs") or []:
            if out.get("md5"):
                tags[f"data_version.{dvc_file.name}:{out.get('path')}"] = str(out["md5"])
    return tags


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for a file (of its bytes) or a folder (of its sorted listing of
    {"md5", "relpath"} entries as JSON, suffixed ".dir"), as in dvc.lock."""
    import hashlib
    import json

    path = Path(path)
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    entries = [
        {"md5": dvc_md5(item), "relpath": item.relative_to(path).as_posix()}
        for item in sorted(path.rglob("*"))
        if item.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def content_tags(paths, root: Path | None = None) -> dict[str, str]:
    """`dvc.md5:<path>` tags (path relative to root, the working directory) for each existing file
    or folder: the exact data and outputs of a run, written after it installed them."""
    root = Path(root or Path.cwd()).resolve()
    tags = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        try:
            name = path.resolve().relative_to(root).as_posix()
        except ValueError:
            name = path.resolve().as_posix()
        tags[f"dvc.md5:{name}"] = dvc_md5(path)
    return tags


def context_tags() -> dict[str, str]:
    """How this run was started: by DVC (stage, experiment name), a Hydra run or sweep, or plain
    Python, with the Hydra overrides it was given."""
    tags: dict[str, str] = {}
    if os.environ.get("DVC_STAGE"):
        tags["dvc_stage"] = os.environ["DVC_STAGE"]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    runner = "dvc" if "dvc_stage" in tags or "dvc_exp_name" in tags else "python"
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            mode = str(hc.mode).rsplit(".", 1)[-1].lower()  # run | multirun
            runner = f"hydra-{mode}"
            tags["hydra_overrides"] = " ".join(hc.overrides.task) or "(none)"
            tags["hydra_output_dir"] = str(hc.runtime.output_dir)
            if mode == "multirun":
                tags["hydra_sweep_dir"] = str(hc.sweep.dir)
                tags["hydra_job_num"] = str(hc.job.num)
                tags["hydra_sweeper"] = str(hc.sweeper.get("_target_", "basic")).rsplit(".", 1)[-1]
                tags["hydra_launcher"] = str(hc.launcher.get("_target_", "basic")).rsplit(".", 1)[-1]
    except (ImportError, ValueError):
        pass
    tags["runner"] = runner
    tags.update(process_tags())
    return tags


NOT_NAMED = ("paths.", "mlflow.", "hydra.", "data.collections.")  # where-to keys; collections: named apart


def config_hash(params: dict) -> str:
    """7 hex digits of the resolved config, where-to keys (paths.*, mlflow.*) left out: two runs
    with the same hash trained the same recipe on the same collections."""
    import hashlib
    import json

    kept = {k: v for k, v in flatten_params(params).items() if not k.startswith(NOT_NAMED[:3])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode("utf-8")).hexdigest()[:7]


def differences(params: dict, reference: dict) -> list[str]:
    """`key=value` for each value of params that the reference composition lacks or holds
    otherwise (`~key` for one params lacks), where-to keys and collection definitions left out."""
    ours, theirs = flatten_params(params), flatten_params(reference)
    changed = [f"{k}={v}" for k, v in ours.items() if theirs.get(k) != v and not k.startswith(NOT_NAMED)]
    return sorted(changed + [f"~{k}" for k in theirs if k not in ours and not k.startswith(NOT_NAMED)])


def closest_preset(params: dict, presets: dict[str, dict]) -> tuple[str, list[str]]:
    """The experiment preset (name: its composition) that params differ least from, and how they
    differ: what a run on a composed params.yaml (`dvc repro`, `dvc exp run -S ...`) was given."""
    ranked = sorted((len(d), name, d) for name, d in ((n, differences(params, c)) for n, c in presets.items()))
    return ranked[0][1], ranked[0][2]


def hydra_choices() -> tuple[str, list[str]] | None:
    """A Hydra run's or sweep job's experiment preset and command-line overrides (where-to keys
    paths.* and mlflow.* and the preset itself left out); None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    skip = ("experiment=", "paths.", "mlflow.")
    return str(hc.runtime.choices.get("experiment") or "default"), [
        o for o in hc.overrides.task if not o.lstrip("+~").startswith(skip)
    ]


def preset_and_overrides(params: dict) -> tuple[str, list[str]]:
    """What a run was given: a Hydra run's preset and overrides as typed; for a run on a composed
    params.yaml, the closest preset of conf/experiment/ and the values that differ from it (so a
    `dvc exp run -S key=value` experiment shows its -S values)."""
    found = hydra_choices()
    if found is not None:
        return found
    from covidxray.infra.config import conf_dir

    presets = preset_compositions(str(conf_dir()))
    return closest_preset(params, presets) if presets else ("default", [])


@functools.lru_cache(maxsize=4)
def preset_compositions(conf: str) -> dict[str, dict]:
    """{preset: its composition} for each conf/experiment/*.yaml that composes (~0.3 s each, once
    per process); one that fails to compose is no candidate."""
    from omegaconf import OmegaConf

    from covidxray.infra.config import compose

    found = {}
    for path in sorted((Path(conf) / "experiment").glob("*.yaml")):
        try:
            found[path.stem] = OmegaConf.to_container(compose([f"experiment={path.stem}"]))
        except Exception:  # noqa: BLE001 - Hydra's and OmegaConf's errors alike: not a candidate
            continue
    return found


def run_name(base: str, preset: str, overrides: list[str], collections: list[str], digest: str) -> str:
    """A run name that says what differs: how it was started (a DVC experiment's name, "pipeline"
    for other runs on params.yaml, nothing for Hydra), the experiment preset, the overrides, the
    collections trained on, the config hash, then `base`, e.g.
    "smoke model.head.dense_units=4 [ieee8023+kermany] #1a2b3c4 (small_cnn-cv2)". Overrides too
    long for MLflow's 250 characters are cut in the middle; the hash still tells runs apart."""
    started = []
    if hydra_choices() is None:
        started = [f"exp {os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else "pipeline"]
    tail = f"[{'+'.join(collections)}] #{digest} ({base})"
    label = " ".join([*started, preset, *overrides])
    room = 240 - len(tail)
    if len(label) > room:
        label = label[: room // 2 - 2] + " .. " + label[-(room // 2 - 2) :]
    return f"{label} {tail}"


def configure_exclusive(configured_uri: str | None, experiment: str) -> str:
    """`configure`, holding the store's lock (store_lock) while it runs: parallel sweep jobs
    (joblib launcher) would otherwise race to create the store's tables or the experiment."""
    with store_lock(configured_uri):
        return configure(configured_uri, experiment)


@contextmanager
def store_lock(configured_uri: str | None = None):
    """An exclusive lock file beside a local SQLite store (a server needs none): held while
    creating what parallel jobs would race for (tables, experiments, the next model version)."""
    uri = tracking_uri(configured_uri or mlflow_uri())
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mlflow_uri() -> str | None:
    """The tracking URI MLflow is set to in this process, if mlflow is imported."""
    import sys

    mlflow = sys.modules.get("mlflow")
    return mlflow.get_tracking_uri() if mlflow is not None else None


# -- runs that ended abnormally -------------------------------------------------------------------


def process_tags() -> dict[str, str]:
    """Which process logs this run (host, pid, pid start time): lets a later run on the same host
    tell whether the run's process still exists."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_START_TAG: process_start(pid) or ""}


def _open_since(run, since_ms: int | None) -> bool:
    """Still RUNNING, or ended FAILED at or after since_ms (when given)."""
    info = run.info
    return info.status == "RUNNING" or (
        since_ms is not None and info.status == "FAILED" and (info.end_time or 0) >= since_ms
    )


def _end_as_killed(client, runs, reason: str, since_ms: int | None = None) -> list[str]:
    """Set each run and its nested runs that are open (or ended since since_ms) to KILLED,
    tagging why; returns their ids."""
    ended: list[str] = []
    for run in runs:
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for item in [run, *(c for c in children if _open_since(c, since_ms))]:
            if item.info.run_id in ended:  # a fold run found itself (its own tags) and as a child
                continue
            client.set_tag(item.info.run_id, "covidxray.killed", reason)
            client.set_terminated(item.info.run_id, "KILLED")
            ended.append(item.info.run_id)
    return ended


def end_open_children(run_id: str, status: str = "FAILED") -> list[str]:
    """End the nested runs of `run_id` still RUNNING (fold runs) with `status`: a parent that
    fails ends its folds with it, in the same `finally`. Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
    )
    for child in children:
        client.set_terminated(child.info.run_id, status)
    return [c.info.run_id for c in children]


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of this experiment whose process, on this host, is gone
    (killed without a chance to end them). Runs of other hosts are left alone. Returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    )
    orphans = [
        r
        for r in running
        if r.data.tags.get(PID_TAG, "").isdigit()
        and not process_alive(int(r.data.tags[PID_TAG]), r.data.tags.get(PID_START_TAG))
    ]
    return _end_as_killed(client, orphans, "its process was gone (found by a later run)")


def end_interrupted_runs(since_ms: int) -> list[str]:
    """End as KILLED the runs this process opened that were open at since_ms (the interrupt):
    still RUNNING, or ended FAILED since by the unwinding `with mlflow.start_run()` blocks, with
    their nested runs. Returns their ids."""
    if not _CONFIGURED:
        return []
    import mlflow
    from mlflow.tracking import MlflowClient

    while mlflow.active_run() is not None:  # runs started without `with`
        mlflow.end_run("KILLED")
    mine = " and ".join(f"tags.`{k}` = '{v}'" for k, v in process_tags().items() if k != PID_START_TAG)
    ended = []
    for uri, experiment_id in sorted(_CONFIGURED):
        client = MlflowClient(tracking_uri=uri)
        runs = [r for r in client.search_runs([experiment_id], mine) if _open_since(r, since_ms)]
        ended += _end_as_killed(client, runs, "interrupted (SIGINT)", since_ms)
    return ended
