"""The `covidxray` command: one subcommand per pipeline stage, plus tools.

Stages (STAGES: pretrained, fetch, curate, split, train, evaluate, loco, study; one module each in
covidxray/stages/, as in dvc.yaml) are Hydra apps composed from conf/, so they take overrides and
`-m` sweeps: `covidxray train -m model=vgg16,mobilenetv2 optimizer.lr=1e-3,1e-4`. DVC runs them as
`covidxray STAGE --params params.yaml`, reading the composed parameters instead. Tools (TOOLS:
predict, validate, calibrate, adapt, manifest in covidxray/tools/, and params) take ordinary options; see
`covidxray TOOL --help`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from covidxray.infra import quiet  # noqa: E402 - before anything imports TensorFlow

quiet.install()  # TensorFlow/absl start-up notices: a one-line error stays one line

from omegaconf import OmegaConf  # noqa: E402

from covidxray import CovidXrayError  # noqa: E402

STAGES = ("pretrained", "fetch", "curate", "split", "train", "evaluate", "loco", "study")
TOOLS = {
    "predict": "covidxray.tools.predict:predict_cli",
    "validate": "covidxray.tools.validate:validate_cli",
    "calibrate": "covidxray.tools.calibrate:calibrate_cli",
    "adapt": "covidxray.tools.adapt:adapt_cli",
    "manifest": "covidxray.tools.manifest:manifest_cli",
    "promote": "covidxray.tools.promote:promote_cli",
    "params": "covidxray.cli:params_cli",
}
USAGE = f"""usage: covidxray STAGE [--params FILE | HYDRA_OVERRIDES... [-m]]
       covidxray TOOL [OPTIONS]
stages: {", ".join(STAGES)}
tools:  {", ".join(TOOLS)}
shell completion: eval "$(covidxray -sc install=bash)"  (zsh: install=zsh; fish: covidxray -sc install=fish | source)"""
COMPLETION_FLAGS = ("-sc", "--shell-completion")
# Completion scripts: command names at the first word; a stage's overrides from that stage's
# Hydra app (`covidxray STAGE -sc query=...`, with the stage word taken out of COMP_LINE); a tool's
# options, for a word starting with "-", from its argparse usage (`covidxray TOOL -sc query=...`).
BASH_COMPLETION = """_covidxray_completion()
{
    local stages="%(stages)s" cur="${COMP_WORDS[COMP_CWORD]}"
    if (( COMP_CWORD == 1 )); then
        compopt +o nospace 2>/dev/null
        COMPREPLY=($(compgen -W "$stages %(tools)s" -- "$cur"))
    elif [[ " $stages " == *" ${COMP_WORDS[1]} "* ]]; then
        local choices
        choices=$(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" \\
                  "${COMP_WORDS[0]}" "${COMP_WORDS[1]}" -sc query=bash 2>/dev/null)
        COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$cur"))
    elif [[ " %(tools)s " == *" ${COMP_WORDS[1]} "* && "$cur" == -* ]]; then
        compopt +o nospace 2>/dev/null
        COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${COMP_WORDS[1]}" -sc query=bash 2>/dev/null)" -- "$cur"))
    fi
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _covidxray_completion covidxray"""
FISH_COMPLETION = """function __covidxray_complete
    set -lx COMP_LINE (commandline -cp)
    set -l words (commandline -cpo)
    covidxray $words[2] -sc query=fish 2>/dev/null
end
complete -c covidxray -e
complete -c covidxray -f -n '__fish_use_subcommand' -a '%(stages)s %(tools)s'
complete -c covidxray -f -n '__fish_seen_subcommand_from %(stages)s' -a '(__covidxray_complete)'
complete -c covidxray -n '__fish_seen_subcommand_from %(tools)s; and string match -q -- "-*" (commandline -ct)' \
    -a '(covidxray (commandline -cpo)[2] -sc query=fish 2>/dev/null)'"""


# `${covidxray.run_id:}` in conf/config.yaml's hydra.run.dir and sweep.dir: this process's id and a
# random part, so runs started in the same second get folders of their own. Registered on import,
# so launcher workers (joblib, submitit), which import this module to run a job, resolve it too;
# Hydra copies the launching process's resolved values into every job of a sweep.
RUN_ID = f"{os.getpid()}-{os.urandom(2).hex()}"
if not OmegaConf.has_resolver("covidxray.run_id"):
    OmegaConf.register_new_resolver("covidxray.run_id", lambda: RUN_ID, use_cache=True)


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _chain(err: BaseException) -> list[BaseException]:
    """err, then what caused it, then what caused that (MLflow and SQLAlchemy wrap the OS's error)."""
    found, seen = [], err
    while seen is not None and seen not in found:
        found.append(seen)
        seen = seen.__cause__ or seen.__context__
    return found


# SQLite's result codes for a write that failed: disk full (SQLITE_FULL), a write, sync or truncate
# the OS refused (a file size limit, EIO: SQLITE_IOERR_*), a read-only file or folder.
STORE_WRITE_FAILURES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


def _store_failure(err: BaseException) -> bool:
    sqlite3 = sys.modules.get("sqlite3")
    name = str(getattr(err, "sqlite_errorname", ""))
    return sqlite3 is not None and isinstance(err, sqlite3.Error) and name.startswith(STORE_WRITE_FAILURES)


def _store_operation(wrappers: list[BaseException]) -> str:
    """What was being written to the store: the MLflow store method (log_batch, create_run,
    set_registered_model_alias...) the failure came through, else the project's own function."""
    import traceback

    frames = [frame for seen in wrappers for frame, _ in traceback.walk_tb(seen.__traceback__)]
    names = [(f.f_code.co_filename.replace(os.sep, "/"), f.f_code.co_name) for f in frames]
    store = [n for path, n in names if "/mlflow/store/" in path and "/mlflow/store/db/" not in path]
    ours = [n for path, n in names if "/covidxray/" in path and n != "<module>"]
    return next((n for n in reversed(store) if not n.startswith("_")), None) or (ours[-1] if ours else "a write")


def _store_line(chain: list[BaseException], at: int) -> str:
    """One line for the SQLite store's failed write chain[at] (SQLite names no file, only "database
    or disk is full" or "disk I/O error"): the store's path (MLflow's tracking URI) and what was
    being written, found in the exceptions that wrap it (raise ... from: MLflow's, SQLAlchemy's)."""
    first = at
    while first > 0 and chain[first - 1].__cause__ is chain[first]:
        first -= 1
    mlflow = sys.modules.get("mlflow")
    uri = mlflow.get_tracking_uri() if mlflow is not None else "?"
    store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri
    return f"cannot write to the MLflow store {store} ({_store_operation(chain[first : at + 1])}): {chain[at]}"


def write_error(err: BaseException) -> str | None:
    """One line for a write that failed for want of room or rights (disk full, quota, file size
    limit, read-only file system, no permission), found in err or what caused it (MLflow and
    shutil wrap them: shutil.Error lists every file of a copy; the MLflow store's SQLite errors
    name no file); the first write that failed where one failure led to others (a run ended as
    FAILED in a store on the same full disk); None for any other error."""
    from covidxray.infra import outputs

    chain = _chain(err)
    for at in reversed(range(len(chain))):
        if _store_failure(chain[at]):
            return _store_line(chain, at)
        found = outputs.write_failure(chain[at])
        if found is not None:
            return f"cannot write {found[0] or 'a file'}: {found[1]}"
    return None


class _StoreWriteFailureLog:
    """Drops MLflow's ERROR log (a traceback) of a failed store write: MLflow raises the error right
    after logging it, and one_line_errors says it in one line."""

    def filter(self, record) -> bool:
        return not (record.exc_info and any(_store_failure(e) for e in _chain(record.exc_info[1])))


@contextmanager
def one_line_errors(command: str):
    """A CovidXrayError, or a write that failed for want of room or rights, as one line and exit 1."""
    try:
        yield
    except CovidXrayError as err:
        print(f"covidxray {command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        line = write_error(err)
        if line is None:
            raise
        print(f"covidxray {command}: error: {line}", file=sys.stderr)
        sys.exit(1)


def _run_stage(stage: str, cfg):
    """Run one stage's `main(cfg)`, turning a CovidXrayError or a failed write into a one-line
    error and exit 1. Returns what the stage returns (train: the metric Hydra sweepers optimize)."""
    with one_line_errors(stage):
        return _load(f"covidxray.stages.{stage}:main")(cfg)


def run_stage_from_params(stage: str, params_file: str) -> None:
    """Run a stage on an already composed parameter file (what `dvc repro` does); the pipeline's
    params.yaml must be the composition of conf/ (infra.config.check_params_fresh)."""
    from covidxray.infra.config import check_params_fresh

    path = Path(params_file)
    try:
        cfg = load_params(path)
        check_params_fresh(path, cfg)
    except CovidXrayError as err:
        print(f"covidxray {stage}: error: {err}", file=sys.stderr)
        sys.exit(1)
    _run_stage(stage, cfg)


def load_params(path: Path):
    """A composed parameter file as a DictConfig; a missing file, a YAML syntax error (with its
    line and column) or a file that is not a mapping is a one-line CovidXrayError."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    if not path.is_file():
        raise CovidXrayError(f"parameter file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise CovidXrayError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(cfg, DictConfig):
        raise CovidXrayError(f"{path}: expected a mapping of parameters (key: value), got a {type(cfg).__name__}")
    return cfg


def run_stage_with_hydra(stage: str, overrides: list[str]) -> None:
    """Run a stage as a Hydra app over conf/, so overrides, -m sweeps and launchers all work."""
    import hydra

    from covidxray.infra.config import check_overrides, conf_dir

    from covidxray.data.collections import check_chosen_files

    elsewhere = any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides)  # collections not in conf/
    try:
        if not elsewhere:
            check_chosen_files(conf_dir(), overrides)  # Hydra's own message for a missing file spans lines
        if not any(o.startswith("-") for o in overrides):  # not a sweep (-m) or a Hydra flag
            check_overrides(overrides)  # composed with the search path where one is given
    except CovidXrayError as err:
        print(f"covidxray {stage}: error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.argv = [f"covidxray {stage}", *overrides]

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg):
        return _run_stage(stage, cfg)

    app()


def params_cli(argv: list[str]) -> int:
    """`covidxray params [OVERRIDES...] [--out FILE]`: write the composed conf/ (as DVC does)."""
    import argparse

    from dvc.utils.hydra import compose_and_dump

    from covidxray.infra.config import conf_dir

    parser = argparse.ArgumentParser(prog="covidxray params", description=params_cli.__doc__)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default="params.yaml")
    args = parser.parse_args(argv)
    from covidxray.data.collections import check_chosen_files

    check_chosen_files(conf_dir(), args.overrides)
    compose_and_dump(args.out, str(conf_dir()), None, "config", "", args.overrides)
    print(f"wrote {args.out}")
    return 0


def completion_script(action: str, shell: str) -> str:
    """The script that `eval` (bash, zsh) or `source` (fish) installs or removes."""
    names = {"stages": " ".join(STAGES), "tools": " ".join(TOOLS)}
    if shell == "fish":
        if action == "install":
            return FISH_COMPLETION % names
        return "complete -c covidxray -e\nfunctions -e __covidxray_complete"
    if action == "uninstall":
        return "complete -r covidxray 2>/dev/null\nunset -f _covidxray_completion"
    return ("autoload -Uz bashcompinit && bashcompinit\n" if shell == "zsh" else "") + BASH_COMPLETION % names


def tool_options(tool: str) -> list[str]:
    """A tool's long options (--model, --gradcam, ...), read from the usage its argparse parser
    prints for --help: the tool's own definition, nothing listed twice."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        _load(TOOLS[tool])(["--help"])
    usage = printed.getvalue().split("\n\n", 1)[0]  # the usage paragraph: options, not their help
    return sorted(set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", usage)) | {"--help"})


def shell_completion(stage: str | None, rest: list[str]) -> None:
    """`-sc install|uninstall|query=SHELL` through this dispatcher (`stage`: the stage or tool
    named before -sc, if any). Hydra's own script would complete `covidxray` by calling
    `covidxray -sc query=bash`, which names no stage; a tool's query lists its options."""
    action, _, shell = (rest[0] if len(rest) == 1 else "").partition("=")
    if action not in ("install", "uninstall", "query") or shell not in ("bash", "zsh", "fish"):
        print(
            "covidxray: error: -sc takes install=SHELL, uninstall=SHELL or query=SHELL (SHELL: bash, zsh or "
            'fish), e.g. eval "$(covidxray -sc install=bash)"',
            file=sys.stderr,
        )
        sys.exit(2)
    if action != "query":
        print(completion_script(action, shell))
    elif stage in TOOLS:
        print("\n".join(tool_options(stage)))
    elif stage is not None:  # Hydra completes the line after the program name: drop the stage word
        line = os.environ.get("COMP_LINE", "")
        os.environ["COMP_LINE"] = re.sub(rf"^(\s*\S+\s+){re.escape(stage)}(?=\s|$)", r"\1", line, count=1)
        run_stage_with_hydra(stage, ["-sc", "query=fish" if shell == "fish" else "query=bash"])


def _dispatch(command: str, rest: list[str]) -> None:
    if command in COMPLETION_FLAGS:
        return shell_completion(None, rest)
    if (command in STAGES or command in TOOLS) and rest[:1] and rest[0] in COMPLETION_FLAGS:
        return shell_completion(command, rest[1:])
    if command in STAGES:
        if rest[:1] == ["--params"]:
            if len(rest) != 2:
                print(f"covidxray {command}: error: --params takes exactly one file", file=sys.stderr)
                sys.exit(2)
            run_stage_from_params(command, rest[1])
        else:
            run_stage_with_hydra(command, rest)
        return
    if command in TOOLS:
        with one_line_errors(command):
            code = _load(TOOLS[command])(rest)
        sys.exit(code)
    print(f"covidxray: error: unknown command '{command}'\n{USAGE}", file=sys.stderr)
    sys.exit(2)


_interrupted_at: list[float] = []


def _on_sigint(signum, frame):
    """Python's own Ctrl-C behaviour (KeyboardInterrupt), noting when it came."""
    _interrupted_at.append(time.time())
    raise KeyboardInterrupt


def _interrupted(command: str) -> None:
    """After Ctrl-C: end the MLflow runs this command opened as KILLED, say so in one line, exit 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    since = int(1000 * (_interrupted_at[0] if _interrupted_at else time.time()))
    note = ""
    tracking = sys.modules.get("covidxray.infra.tracking")  # imported only if the command logged to MLflow
    if tracking is not None:
        try:
            ended = tracking.end_interrupted_runs(since)
            note = f"; MLflow runs ended as KILLED: {len(ended)}" if ended else ""
        except Exception as err:  # noqa: BLE001 - the store may be what hangs; still exit 130
            note = f"; could not end its MLflow runs: {' '.join(str(err).split())[:200]}"
    print(f"covidxray {command}: interrupted{note}", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command = argv[0]
    logging.getLogger("mlflow.store.db.utils").addFilter(_StoreWriteFailureLog())
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        _dispatch(command, argv[1:])
    except KeyboardInterrupt:
        _interrupted(command)


if __name__ == "__main__":
    main()
