"""Real components for teams beyond one machine: a smoke training logging to a real `mlflow
server` (on 127.0.0.1, its own store and artifact folder) through MLFLOW_TRACKING_URI, and a
sweep through the submitit launcher in local mode (the code path of hydra/launcher=slurm)."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from conftest import BIN, REPO, ServerProcess, free_port, make_cfg


def test_smoke_training_logs_to_an_mlflow_server(smoke_cfg, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from covidxray.stages import train
    from covidxray.networks.inference import png_bytes

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    server = ServerProcess(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            root / "artifacts",
        ],
        f"http://127.0.0.1:{port}",
        tmp_path / "server.log",
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as make ui: no GenAI job consumers
        cwd=root,
    )
    try:
        server.wait_ready("/health")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        smoke_cfg.mlflow.tracking_uri = None  # the environment names the server
        result = train.main(smoke_cfg)

        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name(smoke_cfg.mlflow.experiment)
        found = client.search_runs([experiment.experiment_id])
        parent = next(r for r in found if "mlflow.parentRunId" not in r.data.tags)
        assert len(found) == 3 and {r.info.status for r in found} == {"FINISHED"}  # parent + 2 folds
        assert parent.data.metrics["cv_auc_mean"] == result
        assert {"config.yaml", "model.json", "cv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert any((root / "artifacts").rglob("model.keras"))  # the server stored the artifacts
        assert not (tmp_path / "mlruns").exists()  # nothing went to a local store

        version = client.get_model_version(smoke_cfg.mlflow.registered_model, "1")
        assert version.tags["threshold"] == str(parent.data.metrics["threshold"])
        model = mlflow.pyfunc.load_model(f"models:/{smoke_cfg.mlflow.registered_model}/1")  # via the server
        image = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
        answer = model.predict(pd.DataFrame({"image": [png_bytes(image)]}))
        labels = ("normal", "covid", "out-of-distribution")  # noise: likely flagged (test_ood.py)
        assert answer["label"].iloc[0] in labels and 0 <= answer["p_covid"].iloc[0] <= 1
    finally:
        server.stop()


def test_sweep_through_the_submitit_launcher(tiny_data, tmp_path):
    """`-m hydra/launcher=submitit_local`: each job is a separate submitit job (pickled, run by
    submitit in its own process), as on SLURM with hydra/launcher=slurm."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            str(BIN / "covidxray"),
            "train",
            "-m",
            "hydra/launcher=submitit_local",
            "experiment=smoke",
            "model.head.dense_units=4,8",
            "cv.final_model=false",
            f"paths.curated={tiny_data['curated']}",
            f"paths.splits={tiny_data['splits']}",
            f"mlflow.tracking_uri={store}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(make_cfg([]).mlflow.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.runner = 'hydra-multirun'")
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert {r.data.tags["hydra_launcher"] for r in parents} == {"LocalLauncher"}
    assert sorted(r.data.params["model.head.dense_units"] for r in parents) == ["4", "8"]
    assert len({r.data.tags["covidxray.pid"] for r in parents}) == 2  # two processes, one per job
    for job in ("0", "1"):
        assert (sweep / job / "reports" / "cv" / "metrics.json").is_file()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran both jobs
