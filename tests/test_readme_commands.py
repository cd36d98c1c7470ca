"""The README's `covidxray calibrate`, `adapt` and `validate` commands, read from README.md and run
as pasted (optional [...] parts left out), in a folder laid out as a checkout after `make run`:
models/ and mlruns/ of the smoke model trained by the real train stage, and the files the commands
name (site_images/, labels.csv, site_xrays/, other_hospital/) written here with tiny images."""

from __future__ import annotations

import re
import shlex
import shutil

import numpy as np
from PIL import Image

from conftest import REPO, synthetic_xrays
from test_evaluate import tiny  # noqa: F401 (the session's trained smoke model)
from test_predict import run_cli

TOOLS = ("calibrate", "adapt", "validate")


def readme_commands() -> list[str]:
    """The README's bash-block lines running one of TOOLS, continuation lines joined, comments and
    optional [...] parts removed, in the README's order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    found = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        words = line.split()
        if words[:1] == ["covidxray"] and len(words) > 1 and words[1] in TOOLS:
            found.append(" ".join(re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()))
    return found


def write_set(folder, rng, per_class: dict[str, int]) -> list[tuple[str, str]]:
    """Tiny synthetic X-rays, one sub-folder per label; (path relative to folder, label) of each."""
    rows = []
    for label, n in per_class.items():
        (folder / label).mkdir(parents=True)
        for i, image in enumerate(synthetic_xrays(n, 48, label == "covid", rng)):
            Image.fromarray(image).save(folder / label / f"{i}.png")
            rows.append((f"{label}/{i}.png", label))
    return rows


def test_the_readme_site_commands_run_as_pasted(tiny, tmp_path, monkeypatch):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from covidxray import cli

    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["calibrate", "calibrate", "adapt", "calibrate", "validate"], commands
    for name in ("models", "mlruns"):
        shutil.copytree(tiny["root"] / name, tmp_path / name)
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    MlflowClient(tracking_uri=store, registry_uri=store).set_registered_model_alias(
        tiny["meta"]["registered_model"], "champion", str(tiny["meta"]["registered_version"])
    )
    rng = np.random.default_rng(3)
    write_set(tmp_path / "site_images", rng, {"covid": 6, "normal": 6})
    rows = write_set(tmp_path / "labelled", rng, {"covid": 30, "normal": 6})  # 0.9 at 0.95 needs 29 positives
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"labelled/{p},{y}\n" for p, y in rows))
    write_set(tmp_path / "site_xrays", rng, {"ward-a": 6, "ward-b": 6})
    write_set(tmp_path / "other_hospital", rng, {"covid": 4, "normal": 4})
    monkeypatch.chdir(tmp_path)  # the default store (mlruns/) and the relative paths of the commands
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)

    for command in commands:
        tool, *argv = shlex.split(command)[1:]
        code, out, err = run_cli(cli._load(cli.TOOLS[tool]), argv)
        assert code == 0, f"{command}\n{err[-3000:]}"
    calibration = (tmp_path / "models" / "site-a" / "model.json").read_text()
    assert '"site_calibration"' in calibration and '"site_adaptation"' in calibration  # calibrated, adapted copy
    assert (tmp_path / "models" / "site-a-adapted" / "model.keras").is_file()
    assert (tmp_path / "reports" / "validation" / "other_hospital" / "metrics.json").is_file()
