"""Start-up of `covidxray predict` on one image, cold (a fresh process each time, as a user runs it):
the Keras model (a model folder without model.tflite: TensorFlow loads) against the LiteRT model
(the same folder with model.tflite: no TensorFlow). Target: LiteRT <= 2 s on the 2-core CPU.

Both sides run the same image through the real command line (`python -m covidxray.cli predict`),
taking turns round by round (median of --repeats, after one untimed warm-up each so the files sit
in the page cache), and must print the same p(covid) to 4 decimals. Reported: median wall and
CPU seconds (user + system of the process: what other load on the machine inflates least). Start-up depends on whether
Python finds compiled bytecode (PYTHONDONTWRITEBYTECODE=1 with a venv installed by uv or pip
--no-compile compiles every module from source at every start): the result says which it was;
`python -m compileall -q -j0 .venv/lib` makes the other case.

    .venv/bin/python benchmarks/bench_startup_predict.py                      # models/, one X-ray
    .venv/bin/python benchmarks/bench_startup_predict.py --model DIR --image FILE --repeats 5
    .venv/bin/python benchmarks/bench_startup_predict.py --tiny    # the smoke model, 1 round (make test)

Also `mlflow models serve` of each side (--tiny: the LiteRT side), logged as the train stage logs it
(serving/pyfunc.py) to a store in a temporary folder: seconds from the command's start until /ping
answers (serve_ready_*; MLflow's own start-up included, TensorFlow's only on the Keras side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, alternating, cpu_model, images


def tiny_model(folder: Path) -> Path:
    """An untrained smoke-config model (model.keras, model.tflite, model.json) in `folder`."""
    from covidxray.infra import quiet

    quiet.install()
    from covidxray.infra.config import compose
    from covidxray.networks import builders, litert, model_file, ood
    from covidxray.settings.train import fit_settings

    fit = fit_settings(compose(["experiment=smoke"]))
    model = builders.build_model(fit.model.as_config(), fit.image_size, 2)
    folder.mkdir(parents=True)
    model_file.write(model, folder, litert.convert(ood.with_features(model)))  # as the train stage writes it
    meta = {"classes": ["normal", "covid"], "image_size": fit.image_size, "threshold": 0.5, "model": "smoke"}
    (folder / model_file.META_FILE).write_text(json.dumps(meta))
    return folder


def sides(model: Path, work: Path) -> dict[str, Path]:
    """Two model folders: keras (model.keras, model.json) and litert (with model.tflite too);
    a model without model.tflite is converted once (TensorFlow, in this process)."""
    from covidxray.networks.model_file import META_FILE, MODEL_FILE, TFLITE_FILE

    model = model / MODEL_FILE if model.is_dir() else model
    folders = {"keras": work / "keras", "litert": work / "litert"}
    for name, folder in folders.items():
        folder.mkdir()
        for file in (MODEL_FILE, META_FILE) + ((TFLITE_FILE,) if name == "litert" else ()):
            if (model.with_name(file)).is_file():
                os.symlink(model.with_name(file), folder / file)
    if not (folders["litert"] / TFLITE_FILE).exists():
        from covidxray.networks import litert, ood
        from covidxray.networks.model_file import load

        (folders["litert"] / TFLITE_FILE).write_bytes(litert.convert(ood.with_features(load(model))))
    return folders


def an_xray(work: Path, size: int) -> Path:
    """One image file to predict: a curated X-ray where there is a store, else synthetic."""
    from PIL import Image

    x, _, _ = images(size, 1)
    path = work / "xray.png"
    Image.fromarray(x[0]).save(path)
    return path


def predict_once(model: Path, image: Path, out: list, cpu: list) -> None:
    """`covidxray predict IMAGE --model MODEL --csv` in a fresh process; its CSV row goes to `out`,
    its CPU seconds (user + system: less sensitive than wall time to other load) to `cpu`."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "covidxray.cli", "predict", str(image), "--model", str(model), "--csv"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"predict failed ({model}): {done.stderr.strip()[-500:]}")
    out.append(done.stdout.strip().splitlines()[-1])


def logged(folder: Path, store: Path) -> str:
    """The model of `folder` logged as a pyfunc model (as the train stage logs it) to the SQLite
    store `store`: its runs:/ URI. The LiteRT side's model carries model.tflite, as trained ones do."""
    import mlflow
    import numpy as np

    from covidxray.networks import model_file
    from covidxray.serving import pyfunc

    model, meta = model_file.load_model(folder)
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    found = mlflow.get_experiment_by_name("bench")
    experiment = found.experiment_id if found else mlflow.create_experiment("bench", str(store.parent / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        pyfunc.log_model(model, meta, example=np.full((64, 64), 100, np.uint8))
    return f"runs:/{run.info.run_id}/model"


def serve_once(uri: str, store: Path, log: Path) -> None:
    """`mlflow models serve -m URI --env-manager local` in its own session, until /ping answers 200
    (fails after 120 s or when the server exits), then the whole session is stopped."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    argv = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"mlflow models serve not ready ({uri}):\n{log.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def once(fns: dict) -> dict[str, tuple[float, list[float]]]:
    """Each fn timed once, no warm-up (the tiny run: that it works, not how fast)."""
    found = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        found[name] = (seconds, [seconds])
    return found


def bytecode_present() -> bool:
    """Whether numpy's modules have compiled bytecode beside them (what decides cold start-up)."""
    import importlib.util

    import numpy

    return Path(importlib.util.cache_from_source(numpy.__file__)).is_file()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models"), help="a model folder or model.keras")
    parser.add_argument("--image", help="an image file (default: a curated X-ray, else synthetic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="an untrained smoke model, 1 round (a smoke test)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "tiny") if args.tiny else Path(args.model)
        repeats = 1 if args.tiny else args.repeats
        folders = sides(model, work)
        size = json.loads((folders["keras"] / "model.json").read_text())["image_size"]
        image = Path(args.image) if args.image else an_xray(work, max(size, 64))
        rows, cpu = {name: [] for name in folders}, {name: [] for name in folders}
        runs = {n: (lambda n=n: predict_once(folders[n], image, rows[n], cpu[n])) for n in folders}
        found = once(runs) if args.tiny else alternating(runs, repeats)
        store = work / "mlflow.db"
        served = ["litert"] if args.tiny else list(folders)  # tiny: the path trained models take
        uris = {n: logged(folders[n], store) for n in served}
        serve = {f"serve_ready_{n}": (lambda n=n: serve_once(uris[n], store, work / f"serve-{n}.log")) for n in served}
        found |= once(serve) if args.tiny else alternating(serve, repeats)
        shutil.rmtree(work, ignore_errors=True)
    answers = {n: sorted(set(r)) for n, r in rows.items()}
    if answers["keras"] != answers["litert"]:
        raise SystemExit(f"keras and litert answer differently: {answers}")
    results = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "bytecode": bytecode_present(),
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "model": "smoke (untrained)" if args.tiny else str(model),
        "repeats": repeats,
        "answer": answers["litert"][0],
        **{f"{n}_s": round(median, 2) for n, (median, _) in found.items()},
        **{f"{n}_all_s": [round(t, 2) for t in times] for n, (_, times) in found.items()},
        **{f"{n}_cpu_s": round(statistics.median(c[-len(found[n][1]) :]), 2) for n, c in cpu.items()},
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
