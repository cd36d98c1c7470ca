"""Collections as configuration: what one set of labelled X-rays is, read from `data.collections`.

A collection is one file of the Hydra group `conf/collection/<name>.yaml`, composed into
`data.collections.<name>` (its `# @package data.collections.<name>` line), and named in the
`collection: [...]` list of conf/config.yaml. It says where the files come from (`kind`):

- `fetch`: the fetch stage's pinned files (paths.raw, checked against its manifest) and a metadata
  table (`path`, e.g. metadata.csv) with one row per image;
- `folder`: a folder under paths.external with one sub-folder per label (validate's folder format);
- `csv`: a CSV under paths.external with columns path, label[, patient_id] (validate's CSV format),
  paths relative to the CSV's folder and inside it;

how its own labels map to the classes (`labels`: exact label -> class, or {class, finding};
`label_patterns`: ordered [regex, class] pairs; a class of another task leaves the images out, null
leaves them out always); how a patient is found (`patient`: {column: ...}, {pattern: [regex, ...]}
on the file name, or none: each image its own patient until near-duplicate detection ties them);
optional `filters` (views, modality, min_age, max_age); `probe` (its rows of no class of the task
kept apart as the same-source probe); and `age_group`, `citation`, `license` for the audit and the
model card. `parse_collections` checks all of it before any file is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from covidxray import CovidXrayError

TASKS = {"binary": ["normal", "covid"], "three_class": ["normal", "pneumonia", "covid"]}
CLASSES = ("normal", "pneumonia", "covid")  # every class of every task
KINDS = ("fetch", "folder", "csv")
DEFAULT_FINDING = {"covid": "COVID-19", "normal": "No Finding", "pneumonia": "Pneumonia"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
FACTS_FILE = "collections.json"  # in the curated store: per collection, its facts, citation and license
KEYS = {
    "name",
    "kind",
    "path",
    "labels",
    "label_patterns",
    "other_labels",
    "columns",
    "patient",
    "filters",
    "probe",
    "age_group",
    "citation",
    "license",
}
TABLE_COLUMNS = ("path", "label", "view", "sex", "age", "modality")
FILTER_KEYS = ("views", "modality", "min_age", "max_age")


@dataclass(frozen=True)
class Collection:
    """One checked collection definition (see the module docstring for the keys)."""

    name: str
    kind: str
    path: str  # relative to paths.raw (fetch) or paths.external (folder, csv)
    labels: tuple  # ((label, class | None, finding | None), ...)
    label_patterns: tuple  # ((regex, class | None), ...), first match wins
    other_labels: str  # error | leave_out: a label of the data that no entry maps
    columns: tuple  # ((role, column or [columns]), ...) of a table (fetch, csv)
    patient: tuple  # ("column", name) | ("pattern", (regex, ...)) | ("none", None) | ("auto", None)
    filters: tuple  # ((key, value), ...): views, modality, min_age, max_age
    probe_min_age: float | None  # None: no probe; else its rows of no class kept apart (known ages >= it)
    age_group: str | None
    citation: str
    license: str

    @property
    def where(self) -> str:
        return f"data.collections.{self.name}"

    def filter(self, key: str):
        return dict(self.filters).get(key)

    def mapping(self) -> dict:
        return {label: (cls, finding) for label, cls, finding in self.labels}

    def classes(self) -> tuple[str, ...]:
        """Every class its labels map to, in the order of CLASSES."""
        found = {c for _, c, _ in self.labels} | {c for _, c in self.label_patterns}
        return tuple(c for c in CLASSES if c in found)

    def classify(self, label: str) -> tuple[str | None, str | None, bool]:
        """(class or None, finding or None, known) of one label of the data: an exact entry first,
        then the first pattern that matches; known is False where nothing maps it."""
        exact = self.mapping()
        if label in exact:
            cls, finding = exact[label]
            return cls, finding if finding is not None else (DEFAULT_FINDING.get(cls) or label), True
        for pattern, cls in self.label_patterns:
            if re.search(pattern, label):
                return cls, label, True
        return None, None, False


def _fail(where: str, message: str):
    raise CovidXrayError(f"{where}: {message}")


def _text(node: dict, key: str, where: str, optional: bool = False) -> str | None:
    found = node.get(key)
    if found is None and optional:
        return None
    if not isinstance(found, str) or not found.strip():
        _fail(f"{where}.{key}", f"must be a non-empty text{' or null' if optional else ''}, got {found!r}")
    return found.strip()


def _target(cls, key: str) -> str | None:
    if cls is not None and cls not in CLASSES:
        _fail(key, f"maps to {cls!r}, not a class (allowed: {', '.join(CLASSES)}, or null to leave the images out)")
    return cls


def _labels(node, where: str) -> tuple:
    if node is None:
        return ()
    if not hasattr(node, "items"):
        _fail(f"{where}.labels", f"must be a mapping of label -> class, got {node!r}")
    out = []
    for label, entry in node.items():
        key = f"{where}.labels.{label}"
        if hasattr(entry, "items"):
            unknown = set(entry) - {"class", "finding"}
            if unknown:
                _fail(key, f"unknown key(s) {sorted(unknown)} (allowed: class, finding)")
            out.append((str(label), _target(entry.get("class"), key), entry.get("finding")))
        else:
            out.append((str(label), _target(entry, key), None))
    return tuple(out)


def _patterns(node, where: str) -> tuple:
    out = []
    for k, pair in enumerate(node or []):
        key = f"{where}.label_patterns[{k}]"
        if isinstance(pair, str) or len(pair) != 2:
            _fail(key, f"must be a [regex, class] pair, got {pair!r}")
        try:
            re.compile(str(pair[0]))
        except re.error as err:
            _fail(key, f"not a regular expression: {err}")
        out.append((str(pair[0]), _target(pair[1], key)))
    return tuple(out)


def _patient(node, kind: str, where: str) -> tuple:
    key = f"{where}.patient"
    if node is None:
        return ("auto", None) if kind == "csv" else ("none", None)
    if node == "none":
        return ("none", None)
    if not hasattr(node, "items") or len(node) != 1 or next(iter(node)) not in ("column", "pattern"):
        _fail(key, f"must be none, {{column: NAME}} or {{pattern: [REGEX, ...]}}, got {node!r}")
    if "column" in node:
        if kind == "folder":
            _fail(key, "a folder collection has no columns: use {pattern: [...]} on the file name, or none")
        return ("column", _text(node, "column", key))
    patterns = [node["pattern"]] if isinstance(node["pattern"], str) else list(node["pattern"] or [])
    for p in patterns:
        try:
            if re.compile(str(p)).groups < 1:
                _fail(f"{key}.pattern", f"{p!r} needs a group: (...) around the patient part of the file name")
        except re.error as err:
            _fail(f"{key}.pattern", f"{p!r} is not a regular expression: {err}")
    if not patterns:
        _fail(f"{key}.pattern", "must list at least one regex")
    return ("pattern", tuple(str(p) for p in patterns))


def _columns(node, kind: str, where: str) -> tuple:
    defaults = {"csv": {"path": "path", "label": "label"}, "fetch": {}, "folder": {}}[kind]
    given = dict(node or {})
    unknown = set(given) - set(TABLE_COLUMNS)
    if unknown:
        _fail(f"{where}.columns", f"unknown role(s) {sorted(unknown)} (allowed: {', '.join(TABLE_COLUMNS)})")
    if given and kind == "folder":
        _fail(f"{where}.columns", "a folder collection has no columns (labels are its sub-folders)")
    merged = {**defaults, **given}
    if kind == "fetch" and not {"path", "label"} <= set(merged):
        _fail(f"{where}.columns", "a fetch collection needs columns.path and columns.label (its metadata table)")
    return tuple((k, v if isinstance(v, str) else tuple(str(x) for x in v)) for k, v in merged.items())


def _filters(node, where: str) -> tuple:
    given = dict(node or {})
    unknown = set(given) - set(FILTER_KEYS)
    if unknown:
        _fail(f"{where}.filters", f"unknown filter(s) {sorted(unknown)} (allowed: {', '.join(FILTER_KEYS)})")
    out = []
    for key in FILTER_KEYS:
        found = given.get(key)
        if found is None:
            continue
        if key in ("views", "modality"):
            found = [found] if isinstance(found, str) else list(found)
            if not found or any(not isinstance(v, str) for v in found):
                _fail(f"{where}.filters.{key}", f"must be a non-empty list of names, got {found!r}")
            found = tuple(found)
        elif isinstance(found, bool) or not isinstance(found, (int, float)) or found < 0:
            _fail(f"{where}.filters.{key}", f"must be an age in years >= 0 or null, got {found!r}")
        out.append((key, found))
    return tuple(out)


def _probe(node, where: str) -> float | None:
    if node in (None, False):
        return None
    if node is True:
        return 0.0
    if not hasattr(node, "items") or set(node) - {"min_age"}:
        _fail(f"{where}.probe", f"must be false, true or {{min_age: YEARS}}, got {node!r}")
    age = node.get("min_age")
    if age is None:
        return 0.0
    if isinstance(age, bool) or not isinstance(age, (int, float)) or age < 0:
        _fail(f"{where}.probe.min_age", f"must be an age in years >= 0, got {age!r}")
    return float(age)


def parse_collection(key: str, node) -> Collection:
    """One entry of data.collections, checked; errors name the collection, its file
    (conf/collection/<key>.yaml) and the key data.collections.<key>.<field>."""
    try:
        return _parse(key, node)
    except CovidXrayError as err:
        raise CovidXrayError(f"collection {key} (conf/collection/{key}.yaml): {err}") from None


def _parse(key: str, node) -> Collection:
    where = f"data.collections.{key}"
    if not hasattr(node, "items"):
        _fail(where, f"must be a collection definition (conf/collection/{key}.yaml), got {node!r}")
    unknown = set(node) - KEYS
    if unknown:
        _fail(where, f"unknown key(s) {sorted(unknown)} (allowed: {', '.join(sorted(KEYS))})")
    name = _text(node, "name", where)
    if name != key:
        _fail(
            f"{where}.name",
            f"is {name!r}, not {key!r}: the `# @package data.collections.NAME` line of a collection file "
            "and its name must agree (two files with one package line replace each other)",
        )
    if not NAME.match(name):
        _fail(f"{where}.name", f"{name!r} must be letters, digits, _ or - (it prefixes image and patient ids)")
    kind = node.get("kind")
    if kind not in KINDS:
        _fail(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    path = _text(node, "path", where)
    if Path(path).is_absolute() or ".." in Path(path).parts:
        _fail(f"{where}.path", f"must be relative and stay inside its root folder, got {path!r}")
    labels, patterns = _labels(node.get("labels"), where), _patterns(node.get("label_patterns"), where)
    if not labels and not patterns:
        _fail(f"{where}.labels", "maps no label to a class")
    if patterns and kind != "fetch":
        _fail(f"{where}.label_patterns", "are read from a metadata table: only a fetch collection has them")
    if node.get("filters") and kind == "folder":
        _fail(f"{where}.filters", "select on table columns: a folder collection has none (use a csv collection)")
    other = node.get("other_labels") or "error"
    if other not in ("error", "leave_out"):
        _fail(f"{where}.other_labels", f"must be error or leave_out, got {other!r}")
    return Collection(
        name=name,
        kind=kind,
        path=path,
        labels=labels,
        label_patterns=patterns,
        other_labels=other,
        columns=_columns(node.get("columns"), kind, where),
        patient=_patient(node.get("patient"), kind, where),
        filters=_filters(node.get("filters"), where),
        probe_min_age=_probe(node.get("probe"), where),
        age_group=_text(node, "age_group", where, optional=True),
        citation=_text(node, "citation", where, optional=True) or "",
        license=_text(node, "license", where, optional=True) or "",
    )


def parse_collections(definitions, task: str | None = None) -> tuple[Collection, ...]:
    """Every entry of data.collections, checked; with a task, each must provide one of its classes."""
    if not definitions or not hasattr(definitions, "items"):
        raise CovidXrayError(
            "data.collections must map names to collection definitions (conf/collection/<name>.yaml, "
            f"chosen by `collection: [...]` in conf/config.yaml), got {definitions!r}"
        )
    parsed = tuple(parse_collection(str(key), node) for key, node in definitions.items())
    if task is not None:
        wanted = TASKS[task]
        for c in parsed:
            if not set(c.classes()) & set(wanted):
                _fail(
                    f"collection {c.name} (conf/collection/{c.name}.yaml): {c.where}.labels",
                    f"provides {', '.join(c.classes())}, no class of task {task} (its classes: {', '.join(wanted)})",
                )
        lacking = [k for k in wanted if not any(k in c.classes() for c in parsed)]
        if lacking:
            chosen = ", ".join(c.name for c in parsed)
            _fail("data.collections", f"no collection provides {', '.join(lacking)} (task {task}; chosen: {chosen})")
    return parsed


def provides(definitions, task: str | None = None) -> dict[str, tuple[str, ...]]:
    """Per collection of `data.collections` (a mapping), the classes it provides (of `task` only,
    when given), as plain data: {"ieee8023": ("pneumonia", "covid"), ...}."""
    out = {}
    for c in parse_collections(definitions):
        out[c.name] = tuple(k for k in c.classes() if task is None or k in TASKS[task])
    return out


_PACKAGE_LINE = re.compile(r"^#\s*@package\s+(\S+)\s*$", re.MULTILINE)


def check_definition_files(folder: Path) -> None:
    """No two files of conf/collection/ claim one collection (the same package line or the same
    name): the later would silently replace the earlier when both are chosen."""
    import yaml

    seen: dict[str, Path] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        text = path.read_text()
        package = _PACKAGE_LINE.search(text)
        try:
            body = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise CovidXrayError(f"{path}: not valid YAML: {' '.join(str(err).split())[:200]}") from None
        name = body.get("name") if isinstance(body, dict) else None
        for claim in {f"name {name!r}" if name else None, f"package {package[1]}" if package else None} - {None}:
            if claim in seen:
                raise CovidXrayError(
                    f"duplicate collection: {seen[claim]} and {path} both have {claim} (key data.collections; "
                    "give each collection its own name and `# @package data.collections.NAME` line)"
                )
            seen[claim] = path


def chosen_names(conf: Path, overrides) -> list[str]:
    """The collections that conf/config.yaml's `collection: [...]` and a `collection=[...]`
    override choose (what Hydra composes into data.collections)."""
    import yaml

    defaults = (yaml.safe_load((Path(conf) / "config.yaml").read_text()) or {}).get("defaults") or []
    names = next((e["collection"] for e in defaults if isinstance(e, dict) and "collection" in e), [])
    names = [names] if isinstance(names, str) else list(names or [])
    for item in overrides or []:
        match = re.match(r"^\+{0,2}collection=(.*)$", str(item))
        if match:
            names = [n.strip() for n in match[1].strip().strip("[]").split(",") if n.strip()]
    return names


def check_chosen_files(conf: Path, overrides) -> None:
    """Every chosen collection has its file conf/collection/<name>.yaml (one line naming it)."""
    for name in chosen_names(conf, overrides):
        path = Path(conf) / "collection" / f"{name}.yaml"
        if not path.is_file():
            raise CovidXrayError(
                f"collection {name}: definition file missing: {path} (key collection=[...] of conf/config.yaml, "
                f"composed into data.collections.{name})"
            )


def load_facts(curated: Path) -> dict:
    """The curated store's per-collection facts ({name: {images, ..., citation, license}}); {} for a
    store curated before collections were configuration."""
    import json

    path = Path(curated) / FACTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
