"""Configuration: composing conf/ (Hydra) and reading one checked value at a dotted key.

No TensorFlow is imported here, so a bad value is reported in a second or two, before any model
code loads. The stages' settings (covidxray.settings) are built from these readers. Errors are
CovidXrayErrors of one line naming the key, what is allowed, and what was given.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NoReturn

from covidxray import CovidXrayError


# -- composition -------------------------------------------------------------------------------------


def conf_dir() -> Path:
    """The project's conf/: the one in the working directory, else the one beside the package."""
    here = Path.cwd() / "conf"
    if (here / "config.yaml").exists():
        return here
    return Path(__file__).resolve().parents[3] / "conf"


def compose(overrides: list[str] | None = None):
    """The composed, resolved configuration (no Hydra run): what params.yaml holds."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return cfg


def _patch(node: dict, before: dict, after: dict) -> None:
    """Carry into `node` what changed from `before` to `after` (keys set, changed or removed)."""
    for key in before:
        if key not in after:
            node.pop(key, None)
    for key, new in after.items():
        old = before.get(key)
        if isinstance(new, dict) and isinstance(old, dict) and isinstance(node.get(key), dict):
            _patch(node[key], old, new)
        elif key not in before or new != old:
            node[key] = new


def with_overrides(cfg, overrides: list[str], key: str):
    """`cfg` (a composed configuration, e.g. params.yaml with a DVC experiment's -S values) with
    Hydra overrides applied: what `overrides` change in conf/'s composition (group choices such as
    algorithm=coral, or keys) is carried into a copy of cfg, the rest of cfg kept. A bad override
    is a one-line error naming `key`."""
    from omegaconf import OmegaConf

    try:
        before, after = OmegaConf.to_container(compose()), OmegaConf.to_container(compose(list(overrides)))
    except Exception as err:  # Hydra's override and composition errors span several lines
        raise CovidXrayError(f"{key}: {' '.join(str(err).split())[:300]}") from None
    node = OmegaConf.to_container(cfg, resolve=True)
    _patch(node, before, after)
    return OmegaConf.create(node)


def first_difference(a, b, path: str = "") -> str | None:
    """The dotted key where two nested mappings first differ (in a value, a key or the order of
    the keys: the order of data.collections decides which copy of a duplicate is kept), or None."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return None if a == b else path.rstrip(".") or "(the whole file)"
    for key in [*a, *(k for k in b if k not in a)]:
        if key not in a or key not in b:
            return f"{path}{key}"
        found = first_difference(a[key], b[key], f"{path}{key}.")
        if found is not None:
            return found
    return None if list(a) == list(b) else f"{path.rstrip('.') or '(top level)'} (order of its keys)"


def check_params_fresh(path: Path, params) -> None:
    """The pipeline's params.yaml (in the working directory, beside conf/) must be the composition
    of conf/: `dvc repro` compares each stage's params with params.yaml only, so after an edit of
    conf/ without `make params` it would rerun nothing, or rerun on the old values, and exit 0.
    Inside `dvc exp run` (DVC_EXP_NAME set) DVC writes params.yaml itself, from conf/ and -S."""
    import os

    from omegaconf import OmegaConf

    here = Path.cwd()
    if os.environ.get("DVC_EXP_NAME") or not (here / "conf" / "config.yaml").is_file():
        return
    if Path(path).resolve() != (here / "params.yaml").resolve():
        return
    key = first_difference(OmegaConf.to_container(compose()), OmegaConf.to_container(params))
    if key is not None:
        raise CovidXrayError(f"params.yaml is stale: run make params (conf/ composes {key} differently)")


def check_overrides(overrides: list[str]) -> None:
    """Compose conf/ with a command line's overrides once before Hydra runs them, so that Hydra's
    own errors (an unknown key, group or option, a malformed override: 7-17 lines) are one line
    naming the override and what is allowed. Hydra's own settings (hydra.run.dir, hydra/launcher=...)
    are left to Hydra, except its search path (hydra.searchpath=[...]: more config folders, e.g. a
    plugin's algorithm), which the composition reads its options from."""
    from hydra.errors import HydraException, MissingConfigException

    overrides = [o for o in overrides if _composed(o)]
    try:
        compose(overrides)
    except MissingConfigException as err:  # a group's option (or a group) that does not exist
        found = re.search(r"Could not find '([^']+)'", str(err))
        group, _, option = (found.group(1) if found else str(err).splitlines()[0]).rpartition("/")
        allowed = ", ".join(err.options or []) or "none"
        raise CovidXrayError(f"{group or option}: no option {option!r} in conf/{group} (allowed: {allowed})") from None
    except HydraException as err:
        found = re.match(r"Could not override '([^']+)'", str(err))
        if found and "not in struct" in str(err.__cause__):
            others = [o for o in overrides if not o.lstrip("+~").startswith(f"{found.group(1)}=")]
            raise CovidXrayError(_unknown_key(found.group(1), others)) from None
        raise CovidXrayError(" ".join(" ".join(str(err).splitlines()[:2]).split())) from None


def _composed(override: str) -> bool:
    """Whether an override changes the composition: not one of Hydra's own settings, except its search path."""
    key = override.lstrip("+~")
    return not key.startswith(("hydra.", "hydra/")) or key.startswith("hydra.searchpath")


def _unknown_key(key: str, others: list[str]) -> str:
    """The one line for an override of a key conf/ does not have: the keys beside it (in the
    composition the other overrides choose: another algorithm, a search path)."""
    parent, _, _ = key.rpartition(".")
    try:
        cfg = compose(others)
    except Exception:  # noqa: BLE001 - another bad override: the keys of the plain composition
        cfg = compose([])
    node = value(cfg, parent) if parent else cfg
    keys = ", ".join(sorted(str(k) for k in node.keys())) if hasattr(node, "keys") else "none"
    where = f"keys of {parent}" if parent else "top-level keys"
    return f"{key}: no such key in conf/ ({where}: {keys}; add one with +{key}=...)"


def hydra_output_roots() -> list[Path]:
    """The folders Hydra puts every run's and sweep's output folder in (the first part of a
    relative hydra.run.dir / hydra.sweep.dir: outputs/, multirun/); empty outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        hc = HydraConfig.get()
        dirs = [Path(str(hc.run.dir)), Path(str(hc.sweep.dir))]
    except Exception:  # noqa: BLE001 - no Hydra, or a dir that does not resolve here: nothing to clean
        return []
    return sorted({Path(d.parts[0]) for d in dirs if d.parts and not d.is_absolute() and len(d.parts) > 1})


def hydra_output_dir() -> Path | None:
    """The Hydra job's output folder when a stage runs as a Hydra app (the command line, sweeps),
    None when it runs on a composed parameter file (the pipeline: `--params`) or from Python."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        pass
    return None


# -- reading one checked value -----------------------------------------------------------------------


def fail(key: str, allowed: str, got) -> NoReturn:
    raise CovidXrayError(f"{key} must be {allowed}, got {got!r}")


def value(cfg, key: str):
    """cfg's value at a dotted key, None where any part is missing."""
    node = cfg
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def integer(cfg, key: str, minimum: int, allowed: str | None = None) -> int:
    found = value(cfg, key)
    if isinstance(found, bool) or not isinstance(found, (int, float)) or int(found) != found or found < minimum:
        fail(key, allowed or f"an integer >= {minimum}", found)
    return int(found)


def number(cfg, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool, allowed: str) -> float:
    found = value(cfg, key)
    if isinstance(found, bool) or not isinstance(found, (int, float)) or not math.isfinite(found):
        fail(key, allowed, found)
    if (found <= lo if lo_open else found < lo) or (found >= hi if hi_open else found > hi):
        fail(key, allowed, found)
    return float(found)


def choice(cfg, key: str, allowed) -> str:
    found = value(cfg, key)
    if found not in tuple(allowed):
        fail(key, f"one of {', '.join(allowed)}", found)
    return str(found)


def flag(cfg, key: str) -> bool:
    found = value(cfg, key)
    if not isinstance(found, bool):
        fail(key, "true or false", found)
    return found


def text(cfg, key: str, optional: bool = False) -> str | None:
    found = value(cfg, key)
    if found is None and optional:
        return None
    if not isinstance(found, str) or not found.strip():
        fail(key, "a non-empty text" + (" or null" if optional else ""), found)
    return found
