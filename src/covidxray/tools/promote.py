"""`covidxray promote VERSION`: point the registry alias @champion at a version, on purpose.

The one way besides the committed default pipeline (`dvc repro` on a clean tree) to change which
model `models:/covid-xray-detector@champion` serves. A version whose training run never installed
its model files (failed or killed after registering) is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def promote_cli(argv: list[str]) -> int:
    """`covidxray promote VERSION [--model NAME] [--tracking-uri URI]`: move @champion to VERSION."""
    from covidxray.infra.config import compose
    from covidxray.serving import registry

    parser = argparse.ArgumentParser(prog="covidxray promote", description=promote_cli.__doc__)
    parser.add_argument("version", help="the registered version to serve as @champion (e.g. 3)")
    parser.add_argument("--model", help="registered model name (default: mlflow.registered_model of the config)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlruns/)")
    args = parser.parse_args(argv)
    if not args.version.isdigit():
        parser.error(f"VERSION must be a version number, got {args.version!r}")

    cfg = compose()
    name = args.model or cfg.mlflow.registered_model
    configure_registry(args.tracking_uri or cfg.mlflow.tracking_uri)
    registry.note_installed(Path(cfg.paths.models))  # an install a kill left committed: finished and marked
    before = registry.promote(name, args.version)
    was = f"version {before}" if before else "no version"
    print(f"promote: {name} @{registry.CHAMPION}: {was} -> version {args.version}")
    print(figures_line(registry.figure_tags(name, args.version), registry.figure_tags(name, before) if before else {}))
    return 0


SHOWN = ("loco_auc_mean", "loco_auc_worst", "loco_margin_worst", "loco_calibrated_specificity_mean")


def figures_line(now: dict[str, str], was: dict[str, str]) -> str:
    """The promoted version's LOCO headline (its registered version tags), the replaced version's
    in brackets where it has them: why this version, at a site it never saw."""
    if not now:
        return "  no LOCO figures on this version (the loco stage has not run for it)"
    shown = [
        f"{k.removeprefix('loco_')} {now[k]}" + (f" (was {was[k]})" if k in was else "") for k in SHOWN if k in now
    ]
    return "  LOCO: " + ", ".join(shown)


def configure_registry(configured_uri: str | None) -> None:
    """Point MLflow's tracking and registry at the store (creating nothing else)."""
    from covidxray.infra import tracking

    tracking.use_store(configured_uri)
