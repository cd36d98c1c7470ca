"""The package's layers import one way: infra <- data <- networks <- training <- {evaluation, serving} <-
{stages, tools, settings} <- cli; no stage imports another stage. Walked with `ast`, so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "covidxray"
# Layer of each sub-package (or top-level module); a module may import its own layer and those below.
LAYERS = {
    "": 0,  # covidxray/__init__.py: CovidXrayError
    "infra": 1,
    "data": 2,
    "networks": 3,  # what a network is: catalogue, builders, weight ports, the model file, inference
    "training": 4,  # how it is fitted: specs, trainer, stacked heads, inputs, feature store, the recipe
    "evaluation": 5,
    "serving": 5,
    "settings": 6,
    "stages": 6,
    "tools": 6,
    "cli": 7,
}
# Same layer, but never one another: a stage or tool does not reach into a sibling role.
SIDEWAYS = {("evaluation", "serving"), ("serving", "evaluation"), ("stages", "tools"), ("tools", "stages")}


def _role(module: str) -> str:
    parts = module.split(".")
    return "" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "covidxray":
                found += [(node.lineno, f"covidxray.{a.name}") for a in node.names if a.name != "CovidXrayError"]
            elif node.module.startswith("covidxray."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("covidxray.")]
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        mine = _role(me)
        assert mine in LAYERS, f"{me}: a module outside the known layers {sorted(LAYERS)}"
        for line, target in _imports(path):
            theirs = _role(target)
            if theirs not in LAYERS:
                bad.append(f"{me}:{line} imports {target}, which is in no layer")
            elif LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{me}:{line} imports {target}: up from {mine or 'covidxray'} to {theirs}")
            elif (mine, theirs) in SIDEWAYS:
                bad.append(f"{me}:{line} imports {target}: sideways from {mine} to {theirs}")
            elif mine == "stages" and target.startswith("covidxray.stages.") and target != me:
                bad.append(f"{me}:{line} imports {target}: a stage imports another stage")
    return bad


def test_imports_point_down_the_layers():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker itself: a data module importing a stage is reported."""
    fake = tmp_path / "covidxray"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "x.py").write_text("from covidxray.stages import train\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == ["covidxray.data.x:1 imports covidxray.stages: up from data to stages"]


def test_stages_match_dvc_yaml():
    """`ls stages/` reads like dvc.yaml: one module per stage, and each stage's cmd runs it."""
    import yaml

    stages = yaml.safe_load((PACKAGE.parents[1] / "dvc.yaml").read_text())["stages"]
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == set(stages)
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"covidxray {name} "), stage["cmd"]
        assert f"src/covidxray/stages/{name}.py" in stage["deps"]


def _module_file(module: str) -> Path | None:
    base = PACKAGE.parent / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_files(module: str) -> set[str]:
    """The project files `module` imports, transitively (imports inside functions included), as
    dvc.yaml names them; package __init__ files are left out (empty)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for _, target in _imports(path):
            todo.append(target)
        if path.name == "__init__.py" and "pkgutil.iter_modules(__path__)" in path.read_text():
            todo += [f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"]  # found at run time
        tree = ast.parse(path.read_text())  # `from covidxray.x import module`: the module itself
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("covidxray"):
                todo += [f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")]
    files = {_module_file(m).relative_to(PACKAGE.parents[1]).as_posix() for m in seen}
    return {f for f in files if not f.endswith("__init__.py")}


def test_dvc_deps_follow_the_imports():
    """Each stage's src/ deps in dvc.yaml are exactly the project modules it imports, transitively,
    so a change to any code a stage runs reruns it, and nothing else does."""
    import yaml

    stages = yaml.safe_load((PACKAGE.parents[1] / "dvc.yaml").read_text())["stages"]
    wrong = []
    for name, stage in stages.items():
        declared = {d for d in stage["deps"] if d.startswith("src/")}
        imported = imported_files(f"covidxray.stages.{name}")
        wrong += [f"dvc.yaml: stage '{name}' must list `- {path}` in its deps" for path in sorted(imported - declared)]
        wrong += [
            f"dvc.yaml: stage '{name}' lists `- {path}`, which it does not import"
            for path in sorted(declared - imported)
        ]
    assert not wrong, "\n" + "\n".join(wrong)


def test_pretrained_outs_follow_the_catalogue():
    """The pretrained stage's outs are the converted file of every catalogue entry that names one,
    and the stages that build models depend on each (a backbone added with converted weights is
    one line more in each)."""
    import yaml

    from covidxray.networks import catalogue

    stages = yaml.safe_load((PACKAGE.parents[1] / "dvc.yaml").read_text())["stages"]
    files = {f"models/pretrained/{spec.converted}" for spec in catalogue.converted_backbones().values()}
    assert set(stages["pretrained"]["outs"]) == files
    for name in ("train", "loco"):
        assert files <= set(stages[name]["deps"]), name
