"""TensorFlow's start-up noise, silenced before TensorFlow is imported.

`TF_CPP_MIN_LOG_LEVEL=3` hides TensorFlow's C++ log lines (a real failure raises in Python), but not the lines its
native libraries write while `import tensorflow` runs, before absl logging is set up ("All log
messages before absl::InitializeLog() ...", "oneDNN custom operations are on ...", the CPU
feature notice). `install()` sets the level and wraps the first `import tensorflow`: stderr (the
file descriptor, where native code writes) goes to a temporary file meanwhile, and afterwards
every line of it except those notices is written back, so real errors still show.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cpu_feature_guard"
    r"|rebuild TensorFlow with the appropriate compiler flags|To enable the following instructions"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered"
    r"|TF-TRT Warning|Could not find cuda drivers"
)


def install() -> None:
    """Quiet TensorFlow and absl for this process (call before anything imports tensorflow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ errors too: a failure raises in Python
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices and the like
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds top-level `tensorflow` with the other finders, then imports it with stderr filtered."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders resolve it
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            self.loader.exec_module(module)


class filtered_stderr:
    """File descriptor 2 to a temporary file inside the block; its lines other than NOISE are
    written back to the real stderr afterwards."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.capture = tempfile.TemporaryFile()
        os.dup2(self.capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.capture.seek(0)
        kept = [line for line in self.capture.read().decode(errors="replace").splitlines() if not NOISE.search(line)]
        self.capture.close()
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
        return False
