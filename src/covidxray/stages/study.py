"""study stage: the recipes of `study.recipes` (a name and Hydra overrides each: an algorithm, a
feature source, a head, a preprocessing) run through leave-one-collection-out on the same groups
and seeds (evaluation/loco.py, on the frozen backbone's stored features), and compared with the
baseline recipe (`study.baseline`, the shipped default) per group, paired (evaluation/study.py).

Outputs (reports/study, installed together; a reader sees all old files or all new ones):
  headline.json    DVC metrics: the objective of the best recipe besides the baseline (auc, auc_min:
                   shared keys), how many recipes qualify by the selection rule (qualify)
  study.json       every figure: per recipe its LOCO summary and groups, paired differences, verdicts
  table.csv        one row per recipe (report.md's table)
  forest.csv       DVC plot: recipe, group, delta, low, high, counted
  forest.png       the forest plot of the per-group differences
  report.md        the table, the differences, and the selection rule applied to each recipe
MLflow: a parent run `study` with one nested run per recipe (its overrides and loco_* figures).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from covidxray.evaluation import loco
from covidxray.evaluation import study as S
from covidxray.evaluation.report import fmt
from covidxray.infra.outputs import FIGURE_DIGITS, figures_text, json_safe, replace_dir
from covidxray.settings.study import StudySettings, study_settings

OUT_DIR = "study"


def run_recipes(s: StudySettings) -> dict[str, dict]:
    """{recipe name: its LOCO result (with the collection probe of each group's model)}, in the order
    of s.recipes. Recipes on the same images and inputs run one after the other on one loco.LocoData:
    read and prepared once, their Trainers sharing its feature cache and built models."""
    results, shortcuts = {}, {}  # the shortcut baselines of the held-out sets: the same for every recipe
    data_key, data = None, None
    for r in sorted(s.recipes, key=_data_key):  # stable: the configured order within one data key
        t0 = time.perf_counter()
        print(f"study: recipe {r.name} ({' '.join(r.overrides) or 'no overrides'})")
        ls = r.loco
        if _data_key(r) != data_key:
            data_key, data = _data_key(r), None  # one set of pixels in memory at a time
            data = loco.load(ls.train.curated, ls.train.splits, ls.spec.provides, ls.recipe.inputs)
        results[r.name] = loco.run_on(data, ls.recipe, ls.spec, ls.seed, S.collection_probe(ls.seed), shortcuts)
        results[r.name]["seconds"] = time.perf_counter() - t0
        print(f"study: recipe {r.name} done in {results[r.name]['seconds']:.1f}s")
    return {r.name: results[r.name] for r in s.recipes}


def _data_key(r) -> str:
    """What decides a recipe's loco.LocoData: the curated images, splits, (class, collection) pairs and inputs."""
    ls = r.loco
    return repr(
        (
            str(ls.train.curated),
            str(ls.train.splits),
            sorted(ls.spec.provides.items()),
            sorted(ls.recipe.inputs.items()),
        )
    )


def compare(s: StudySettings, results: dict, positive: str) -> dict:
    """The table rows, per-group paired differences against the baseline, and the verdicts."""
    base = results[s.baseline]
    assess = s.out.assess
    rows, deltas, verdicts = [], {}, {}
    for r in s.recipes:
        row = S.recipe_row(r.name, r.overrides, results[r.name], base)
        rows.append(row)
        if r.name == s.baseline:
            continue
        deltas[r.name] = S.paired_deltas(base, results[r.name], positive, assess.n_resamples, assess.ci, s.seed)
        verdicts[r.name] = S.selection(row, deltas[r.name])
    return {"rows": rows, "deltas": deltas, "verdicts": verdicts}


def headline(s: StudySettings, rows: list[dict], verdicts: dict) -> dict:
    """The study's row of `dvc metrics show`, under the keys the other stages' rows share (one new
    column, qualify: the table stays within 120 columns): the objective of the best recipe besides
    the baseline (auc: its mean over the counted groups, auc_min: its worst; the baseline's, the
    shipped recipe's, are the loco stage's row), and how many recipes qualify by the selection rule."""
    others = [r for r in rows if r["recipe"] != s.baseline and r["auc_mixed_mean"] is not None]
    best = max(others, key=lambda r: r["auc_mixed_mean"], default={})
    found = {
        "auc": best.get("auc_mixed_mean"),
        "auc_min": best.get("auc_mixed_worst"),
        "qualify": sum(ok for ok, _ in verdicts.values()),
    }
    return {k: v for k, v in found.items() if v is not None}


def write_outputs(out: Path, s: StudySettings, results: dict, found: dict) -> dict:
    """Everything under out (reports/study): see the module docstring."""
    out.mkdir(parents=True)
    rows, deltas, verdicts = found["rows"], found["deltas"], found["verdicts"]
    shown = json_safe(headline(s, rows, verdicts), FIGURE_DIGITS)  # as the file holds it
    (out / "headline.json").write_text(figures_text(shown))
    kept = {
        name: {
            "summary": res["summary"],
            "groups": {g: {k: v for k, v in d.items() if k != "seconds"} for g, d in res["groups"].items()},
        }
        for name, res in results.items()
    }
    verdict_text = {n: {"qualifies": ok, "why": why} for n, (ok, why) in verdicts.items()}
    details = {"baseline": s.baseline, "rule": S.SELECTION_RULE, "rows": rows, "deltas": deltas}
    (out / "study.json").write_text(figures_text({**details, "verdicts": verdict_text, "recipes": kept}))
    pd.DataFrame(json_safe(rows, FIGURE_DIGITS)).to_csv(out / "table.csv", index=False)
    table = S.forest_table(deltas)
    table.round(4).to_csv(out / "forest.csv", index=False)
    fig = S.forest_figure(table, s.baseline, s.out.assess.ci)
    fig.savefig(out / "forest.png", dpi=120, bbox_inches="tight")  # long recipe names kept whole
    fig.clf()
    groups = results[s.baseline]["groups"]
    (out / "report.md").write_text(S.report_md(rows, deltas, verdicts, s.baseline, s.out.assess.ci, groups))
    return shown


def log_runs(s: StudySettings, results: dict, found: dict, out: Path) -> str:
    """A parent MLflow run `study` (headline, the report's files) with a nested run per recipe."""
    import mlflow

    from covidxray.evaluation.metrics import finite_metrics
    from covidxray.infra import tracking

    tracking.configure(s.out.tracking_uri, s.out.experiment)
    rows = {r["recipe"]: r for r in found["rows"]}
    with mlflow.start_run(run_name="study") as parent:
        mlflow.set_tags({"stage": "study", "baseline": s.baseline, **tracking.git_tags()})
        for r in s.recipes:
            with mlflow.start_run(run_name=f"study-{r.name}", nested=True):
                mlflow.set_tags({"recipe": r.name, "overrides": " ".join(r.overrides) or "(none)"})
                figures = {**loco.headline(results[r.name]), "loco_seconds": results[r.name]["seconds"]}
                figures.update({f"study_{k}": v for k, v in rows[r.name].items() if isinstance(v, float)})
                mlflow.log_metrics(finite_metrics(figures))
        mlflow.log_metrics(finite_metrics(headline(s, found["rows"], found["verdicts"]), "study_"))
        mlflow.log_artifacts(str(out), artifact_path="study")
        return parent.info.run_id


def main(cfg) -> dict:
    """Stage entry: every recipe checked first, then run, compared, written and logged."""
    s = study_settings(cfg)  # every recipe composed and checked before anything is read or trained
    start = time.perf_counter()
    results = run_recipes(s)
    found = compare(s, results, _positive(s))
    reports = s.out.reports

    def write(work: Path) -> dict:
        return write_outputs(work / OUT_DIR, s, results, found)

    shown = replace_dir(reports, write, by="study", names=(OUT_DIR,))
    run_id = log_runs(s, results, found, reports / OUT_DIR)
    qualified = [n for n, (ok, _) in found["verdicts"].items() if ok]
    base = next(r for r in found["rows"] if r["recipe"] == s.baseline)
    print(
        f"study: {len(s.recipes)} recipes in {time.perf_counter() - start:.0f}s; "
        f"{s.baseline} objective {fmt(base['auc_mixed_mean'])}, the best other {fmt(shown.get('auc'))}; "
        f"qualifying: {', '.join(qualified) or 'none'}; "
        f"wrote {reports / OUT_DIR}; MLflow run {run_id}"
    )
    return shown


def _positive(s: StudySettings) -> str:
    from covidxray.settings.train import TASKS

    return TASKS[s.recipes[0].loco.train.task][-1]
