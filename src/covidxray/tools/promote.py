"""`covidxray promote VERSION`: point the registry alias @champion at a version, on purpose.

The one way besides the committed default pipeline (`dvc repro` on a clean tree) to change which
model `models:/covid-xray-detector@champion` serves. A version whose training run never installed
its model files (failed or killed after registering) is refused.
"""

from __future__ import annotations

import argparse


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
    before = registry.promote(name, args.version)
    was = f"version {before}" if before else "no version"
    print(f"promote: {name} version {args.version} is now @{registry.CHAMPION} (was {was})")
    return 0


def configure_registry(configured_uri: str | None) -> None:
    """Point MLflow's tracking and registry at the store (creating nothing else)."""
    import mlflow

    from covidxray.infra import tracking

    uri = tracking.tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
