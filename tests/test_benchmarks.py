"""Every benchmark under benchmarks/ runs at tiny size (its --tiny option), so none can rot. Each
runs its `main(["--tiny"])` in the test's process, whose TensorFlow is loaded already (a process
per benchmark cost ~5 s of imports each, 40 s of make test's CPU in all); the processes a benchmark
times (start-up, sweeps) it starts itself. head_sweep also runs as a user runs it, a process of its
own, so the scripts' command line is covered too."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def tiny(tmp_path, monkeypatch, capsys):
    """run(name) -> (the results main returns, what it printed): benchmarks/NAME's main(["--tiny"])
    in this process, from tmp_path, with no MLflow setting left by an earlier test's training."""
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))

    def run_main(name: str) -> tuple[dict, str]:
        spec = importlib.util.spec_from_file_location(f"benchmark_{Path(name).stem}", ROOT / "benchmarks" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = module.main(["--tiny"])
        return results, capsys.readouterr().out

    return run_main


def test_every_benchmark_is_covered():
    tested = {
        "bench_feature_cache.py",
        "bench_head_sweep.py",
        "bench_input_pipeline.py",
        "bench_lite0_features.py",
        "bench_ood.py",
        "bench_startup.py",
        "bench_startup_predict.py",
        "bench_study.py",
        "head_loco.py",
    }
    assert set(BENCHMARKS) == tested, "a new benchmark needs a tiny run here"


@pytest.mark.parametrize("name", ["bench_feature_cache.py", "bench_input_pipeline.py"])
def test_benchmark_runs_tiny(name, tiny):
    results, printed = tiny(name)
    shown, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    assert results and shown.keys() == results.keys()  # printed as it returns them (rounded)


def test_lite0_benchmark_reports_engines_and_differences(tiny):
    results, _ = tiny("bench_lite0_features.py")
    fast = results["tflite_b4"]
    assert results["keras"]["images_per_s"] > 0 and fast["images_per_s"] > 0
    assert fast["max_abs_diff_vs_keras"] < 1e-3 * max(1.0, results["feature_abs_max"])


def test_startup_benchmark_times_commands_with_and_without_bytecode(tiny, tmp_path):
    """`covidxray --help` from source and from the bytecode make setup compiles, and `predict` on
    one image with a model the benchmark saves: real processes, every one exiting 0."""
    report, printed = tiny("bench_startup.py")
    results = report["results"]
    assert set(results["covidxray_help"]) == {"no_bytecode", "bytecode"} and set(results["predict_one_image"]) == {
        "bytecode"
    }
    assert all(m["median_s"] > 0 and len(m["times_s"]) == 1 for by_mode in results.values() for m in by_mode.values())
    assert report["cpu"] and report["tensorflow_pyc_files"] >= 0
    assert "predict_one_image:" in printed and list(tmp_path.iterdir()) == []


def test_startup_benchmark_times_both_engines(tiny, tmp_path):
    """`covidxray predict` cold on one image, Keras and LiteRT, the same answer from both; and
    `mlflow models serve` of the LiteRT side, logged as training logs it, until it answers /ping."""
    results, _ = tiny("bench_startup_predict.py")
    assert results["keras_s"] > 0 and results["litert_s"] > 0 and results["cpu"]
    assert results["serve_ready_litert_s"] > 0 and "serve_ready_keras_s" not in results
    assert results["answer"].count(",") >= 3 and isinstance(results["bytecode"], bool)
    assert list(tmp_path.iterdir()) == []


def test_head_sweep_benchmark_times_each_point(tmp_path):
    """Two points of a real `covidxray train -m` over a cold feature store: the first job fills
    it, the second reads it; both timed, both with their CV AUC."""
    done = run([str(ROOT / "benchmarks" / "bench_head_sweep.py"), "--tiny"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    results, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{") :])
    assert results["points"] == results["points_expected"] == 2 and results["total_wall_s"] > 0
    assert [r["job"] for r in results["per_point"]] == [0, 1]
    assert all(r["seconds"] > 0 and 0 <= r["cv_auc_mean"] <= 1 for r in results["per_point"])
    first, second = results["per_point"]
    assert first["misses"] > 0 and second["misses"] == 0 and second["hits"] > 0
    assert not results["store_warm"] and results["warm_job"] is None
    assert list(tmp_path.iterdir()) == []  # MLflow, sweep folders, data: in the benchmark's own temporary folder
    assert "head sweep: 2 points in" in done.stdout


def test_head_loco_runs_tiny(tiny):
    """One point of the head_loco search (a real `covidxray train -m`) with its LOCO AUC, then that
    point against today's head, paired."""
    results, printed = tiny("head_loco.py")
    assert results["points"] == 1 and all(0 <= r["mean"] <= 1 and r["groups"] for r in results["per_point"])
    assert [r["group"] for r in results["paired"]][-1] == "mean" and isinstance(results["wins"], bool)
    assert "| head | l2 | standardize |" in printed


def test_ood_benchmark_reports_each_collection_and_probe(tiny, tmp_path):
    """An untrained smoke model with a detector fitted on smooth synthetic "X-rays": per curated
    collection and partition and per synthetic probe kind, the share flagged and the median score;
    the probes (noise, gradients, checkerboards, natural pictures) flagged more than the X-rays."""
    report, _ = tiny("bench_ood.py")
    found = report["collections"]
    assert report["cpu"] and report["ood_false_alarm_rate"] == 0.05
    assert {"site_a/normal/cv", "site_a/normal/test", "site_b/covid/cv"} <= set(found)
    probes = [f"probe/{k}" for k in ("uniform_noise", "gaussian_noise", "gradient", "checkerboard", "natural")]
    assert all(found[k]["n"] > 0 and 0 <= found[k]["flagged_share"] <= 1 for k in found)
    xrays = [v["median_score"] for k, v in found.items() if k.endswith("/cv")]
    assert min(found[k]["median_score"] for k in probes) > max(xrays)
    assert list(tmp_path.iterdir()) == []


def test_study_benchmark_times_each_recipe(tiny, tmp_path):
    """A real study (the stage's main) of erm on both feature sources over a tiny cold store: its
    wall time, each recipe's seconds from the stage's lines, and the store's misses (cold)."""
    results, printed = tiny("bench_study.py")
    assert results["recipes"] == ["erm", "erm_blocks"] and len(results["studies_s"]) == 1
    (study,) = results["runs"]
    assert list(study["per_recipe_s"]) == ["erm", "erm_blocks"] and all(s > 0 for s in study["per_recipe_s"].values())
    assert study["store_misses"] > 0 and not results["store_warm"] and results["median_s"] == study["wall_s"] > 0
    assert list(tmp_path.iterdir()) == []  # reports, MLflow, data: in the benchmark's own temporary folder
    assert "study: 2 recipes in" in printed
