"""Shell completion through the covidxray dispatcher: the script Hydra's help names
(`eval "$(covidxray train -sc install=bash)"`) completes commands, each stage's overrides and
each tool's options in a real bash (and fish, where installed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import BIN, REPO

BASH = r"""
eval "$(covidxray train -sc install=bash)" || exit 3
fn=$(complete -p covidxray | sed -E 's/.* -F ([^ ]+) .*/\1/') || exit 4
complete_line() {  # what bash sets before calling the completion function, then the answer
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1"
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=()
    "$fn" covidxray "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}" 2>/dev/null
    echo "$1 => ${COMPREPLY[*]}"
}
complete_line "covidxray tr"
complete_line "covidxray train model=vg"
complete_line "covidxray evaluate optimizer."
complete_line "covidxray predict --mo"
complete_line "covidxray calibrate x.csv --t"
"""
WANT = [
    "covidxray tr => train",
    "covidxray train model=vg => model=vgg16 model=vgg19",
    "covidxray evaluate optimizer. => optimizer.lr= optimizer.name= optimizer.schedule=",
    "covidxray predict --mo => --model",  # a tool's options, from its own parser
    "covidxray calibrate x.csv --t => --target-sensitivity --tracking-uri",
]


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_bash_completion_installs_and_completes():
    done = subprocess.run(["bash", "-c", BASH], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == WANT


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_installs_and_completes():
    script = 'covidxray -sc install=fish | source; complete -C "covidxray tr"; complete -C "covidxray train model=vg"'
    done = subprocess.run(["fish", "-c", script], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["train", "model=vgg16", "model=vgg19"]


def test_completion_options_are_checked():
    done = subprocess.run(
        [str(BIN / "covidxray"), "train", "-sc", "install=tcsh"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "covidxray: error: -sc takes install=SHELL, uninstall=SHELL or query=SHELL (SHELL: bash, zsh or fish), "
        'e.g. eval "$(covidxray -sc install=bash)"'
    ]
    uninstall = subprocess.run(
        [str(BIN / "covidxray"), "-sc", "uninstall=bash"], cwd=REPO, capture_output=True, text=True
    )
    assert uninstall.returncode == 0 and "complete -r covidxray" in uninstall.stdout
