"""The model card (reports/model_card.md): how the recipe does at a site it never saw, first.

It opens with the leave-one-collection-out (LOCO) table: per held-out group, AUC beside the
shortcut baseline of the same images and the margin, sensitivity and specificity at the
transferred threshold and at a threshold calibrated on K labelled images of the site; then the
mean and the worst group. Internal figures (CV, internal test, per collection) follow, then the
shortcut probes of the final model. The LOCO report (reports/loco/report.md) is the same table
with the details.
"""

from __future__ import annotations

from covidxray.evaluation.report import fmt

HEADLINE = ("auc", "sensitivity", "specificity")


def _cell(figures: dict, key: str) -> str:
    value = figures.get(key)
    lo, hi = figures.get(f"{key}_ci_low"), figures.get(f"{key}_ci_high")
    return fmt(value) if lo is None or hi is None else f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def internal_table(cv: dict | None, test: dict | None) -> list[str]:
    """Markdown: internal CV (mean ± sd over folds; out-of-fold sensitivity/specificity) and the
    internal test (held-out patients of the training collections) with intervals."""
    cv, test = cv or {}, test or {}
    t = test.get("test", {})
    lines = ["| set | images | ROC AUC | sensitivity | specificity |", "|---|---:|---|---|---|"]
    if cv:
        auc = f"{fmt(cv.get('cv_auc_mean'))} ± {fmt(cv.get('cv_auc_std'))}"
        lines.append(
            f"| internal CV (out-of-fold) | {cv.get('n_cv_images', 'n/a')} | {auc} | "
            f"{fmt(cv.get('oof_sensitivity'))} | {fmt(cv.get('oof_specificity'))} |"
        )
    if t:
        lines.append(
            f"| internal test | {test.get('n_test_images')} | " + " | ".join(_cell(t, k) for k in HEADLINE) + " |"
        )
    return lines


def per_source_table(per_source: dict) -> list[str]:
    """Markdown: per set and (class, collection), images and sensitivity or specificity."""
    lines = ["| set | class / collection | images | sensitivity | specificity |", "|---|---|---:|---|---|"]
    for part, rows in per_source.items():
        for key, row in rows.items():
            lines.append(
                f"| {part} | {key} | {row['images']} | {fmt(row.get('sensitivity'))} | {fmt(row.get('specificity'))} |"
            )
    return lines


def probe_lines(probes: dict) -> list[str]:
    """Markdown: the three shortcut probes, each with what its number means."""
    same = probes.get("same_source_other_finding", {})
    lines = ["### Same source, other finding", ""]
    if same.get("images"):
        lines += [
            f"Of the COVID-19 collection's {same['images']} non-COVID adult X-rays (other pneumonias, ARDS, "
            f"no finding), **{fmt(same['share_labelled_covid'])}** ({same['labelled_covid']}) are called covid. "
            "A model that learnt the collection rather than the disease calls most of them covid.",
            "",
            "| finding | images | share called covid |",
            "|---|---:|---|",
            *[
                f"| {f} | {r['images']} | {fmt(r['share_labelled_covid'])} |"
                for f, r in sorted(same["per_finding"].items(), key=lambda kv: -kv[1]["images"])[:12]
            ],
            "",
        ]
    else:
        lines += ["(no probe images: the COVID-19 collection is not curated)", ""]
    lines += [
        "### Shortcut AUCs (label from image geometry/format, or pixel statistics, alone)",
        "",
        "| set | geometry/format | pixel statistics |",
        "|---|---|---|",
    ]
    for part, aucs in probes.get("shortcut_auc", {}).items():
        lines.append(f"| {part} | {fmt(aucs.get('geometry_format'))} | {fmt(aucs.get('pixel_stats'))} |")
    lines += [
        "",
        "### Do the model's features tell the collections apart within one class?",
        "",
        "Cross-validated AUC of a logistic regression on the model's penultimate features, predicting the "
        "collection within one class (internal test and external images): 0.5 means the features do not "
        "encode the source, 1.0 that they separate it perfectly.",
        "",
        "| class | collections | images | AUC |",
        "|---|---|---:|---|",
    ]
    for label, row in probes.get("feature_collection_auc", {}).items():
        lines.append(f"| {label} | {' vs '.join(row['collections'])} | {row['images']} | {fmt(row['auc'])} |")
    return lines + [""]


def data_lines(facts: dict, names) -> list[str]:
    """Markdown: the collections a model was trained or measured on, with citation and license."""
    rows = [(n, facts[n]) for n in names if n in facts]
    if not rows:
        return []
    lines = ["## Data", "", "| collection | images | citation | license |", "|---|---:|---|---|"]
    lines += [
        f"| {n} | {f.get('images', 'n/a')} | {f.get('citation') or 'n/a'} | {f.get('license') or 'n/a'} |"
        for n, f in rows
    ]
    return lines + [""]


def _pm(mean, sd) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {sd:.3f}"


def loco_table(result: dict, k: int) -> list[str]:
    """Markdown: one row per held-out group, then mean and worst."""
    lines = [
        "| held out | trained on | images | ROC AUC [CI] | shortcut baseline | margin | sensitivity / specificity "
        f"at the transferred threshold | sensitivity / specificity calibrated on {k} site images |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for name, g in result["groups"].items():
        cal = g.get("calibrated") or {}
        calibrated = (
            f"{_pm(cal.get('sensitivity_mean'), cal.get('sensitivity_sd'))} / "
            f"{_pm(cal.get('specificity_mean'), cal.get('specificity_sd'))}"
            if cal
            else "n/a"
        )
        auc = _cell(g, "auc") if g.get("auc") is not None else f"n/a ({g.get('note', 'one class')})"
        margin = "n/a" if g.get("margin") is None else f"{g['margin']:+.3f}"
        lines.append(
            f"| {name} | {g['trained_on'].removeprefix('train ')} | {g['n_images']} | {auc} | "
            f"{fmt(g.get('shortcut_auc'))} | {margin} | {fmt(g.get('sensitivity'))} / {fmt(g.get('specificity'))} "
            f"| {calibrated} |"
        )
    s = result["summary"]
    for what in ("mean", "worst"):
        lines.append(
            f"| **{what}** | | | **{fmt(s.get(f'loco_auc_{what}'))}** | | {fmt(s.get(f'loco_margin_{what}'))} | "
            f"– / {fmt(s.get(f'loco_specificity_{what}'))} | {fmt(s.get(f'loco_calibrated_sensitivity_{what}'))} / "
            f"{fmt(s.get(f'loco_calibrated_specificity_{what}'))} |"
        )
    for what in ("mean", "worst"):  # the objective: groups where class is not collection (loco.objective)
        lines.append(
            f"| **{what}, class not collection** | | | **{fmt(s.get(f'loco_auc_mixed_{what}'))}** | | "
            f"{fmt(s.get(f'loco_margin_mixed_{what}'))} | | |"
        )
    return lines


def loco_notes(result: dict, k: int, ci: float) -> list[str]:
    """What the LOCO table's columns mean."""
    cal = next((g["calibrated"] for g in result["groups"].values() if g.get("calibrated")), None)
    how = (
        "Youden's J"
        if cal is None or cal["method"] == "youden"
        else f"the highest threshold reaching sensitivity {cal['target_sensitivity']:g}"
        + (
            f" on the one-sided {cal['confidence']:.0%} Clopper-Pearson lower bound"
            if cal.get("confidence") is not None
            else ""
        )
    )
    draws = cal["draws"] if cal else "n/a"
    return [
        "",
        "Each row: the recipe trained on the other collections (cross-validated threshold and epochs, as the "
        "train stage does) and measured on every image of the held-out collections, less those sharing a patient "
        "or a near-duplicate group with a training image. Shortcut baseline: the better of the geometry/format "
        "and pixel-statistics AUCs on the same images (a cross-validated decision tree on features unrelated to "
        f"disease); margin = AUC minus baseline. Intervals: {ci:.0%} patient bootstrap. Transferred threshold: "
        f"chosen on the training collections' out-of-fold predictions. Calibrated: {k} labelled images of the "
        f"held-out site ({k // 2} per class) set the threshold by {how}, measured on the site's other images, "
        f"mean ± sd over {draws} draws (`covidxray calibrate` does this for a hospital). A one-class group has no "
        "AUC: it reports its sensitivity or specificity only. *Class not collection* (the headline and the "
        "objective of LOCO sweeps): only the groups with both classes whose shortcut baseline is at most "
        "loco.objective.max_shortcut_auc and that hold at least loco.objective.min_images images; left out: "
        + (
            "; ".join(f"{n} ({g['counted_why']})" for n, g in result["groups"].items() if not g.get("counted", True))
            or "none"
        )
        + ".",
    ]


def calibration_table(result: dict) -> list[str]:
    """Markdown: per group, whether the calibrated threshold kept its promise on the rest of the
    group (share of draws reaching the target), with the lower bound and with the target taken
    on the drawn positives as found (the same draws)."""
    rows = [(n, g["calibrated"]) for n, g in result["groups"].items() if (g.get("calibrated") or {}).get("confidence")]
    if not rows:
        return []
    first = rows[0][1]
    lines = [
        "",
        f"## Calibration that keeps its promise (target sensitivity {first['target_sensitivity']:g})",
        "",
        f"K = {first['k']} labelled images ({first['positives']} positives; the target at {first['confidence']:g} "
        f"confidence needs {first['positives_needed']}), {first['draws']} draws; sensitivity and specificity on the "
        "rest of the group, and the share of draws whose sensitivity there reached the target.",
        "",
        "| held out | rule | target held | sensitivity on the rest | specificity on the rest |",
        "|---|---|---:|---|---|",
    ]
    for name, cal in rows:
        for rule, found in (("lower bound", cal), ("as found", cal.get("point_rule") or {})):
            lines.append(
                f"| {name} | {rule} | {fmt(found.get('target_held'))} | "
                f"{_pm(found.get('sensitivity_mean'), found.get('sensitivity_sd'))} | "
                f"{_pm(found.get('specificity_mean'), found.get('specificity_sd'))} |"
            )
    return lines


def adaptation_table(result: dict) -> list[str]:
    """Markdown: per group, AUC and the transferred threshold's figures without and with site
    adaptation (its pooled features aligned to the training set's, from its own unlabeled images)."""
    rows = [(n, g["adaptation"]) for n, g in result["groups"].items() if g.get("adaptation")]
    if not rows:
        return []
    lines = [
        "",
        "## Site adaptation from unlabeled images",
        "",
        "Each group's pooled features standardized to the training rows' mean and std per feature, the statistics "
        "taken from the group's own images without labels (`covidxray adapt`); the threshold stays the "
        "transferred one.",
        "",
        "| held out | AUC without / with | sensitivity without / with | specificity without / with |",
        "|---|---|---|---|",
    ]
    for name, a in rows:
        cells = [f"{fmt(a.get(m))} / {fmt(a.get(m + '_adapted'))}" for m in ("auc", "sensitivity", "specificity")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def held_out_per_collection(result: dict) -> dict:
    """{"held out <group>": its figures per (class, collection)} for per_source_table."""
    return {f"held out {n}": g.get("per_collection", {}) for n, g in result["groups"].items()}


def loco_report(result: dict, k: int, ci: float) -> str:
    """reports/loco/report.md: the LOCO table, its notes and the figures per collection."""
    lines = [
        "# Leave-one-collection-out",
        "",
        *loco_table(result, k),
        *loco_notes(result, k, ci),
        *calibration_table(result),
        *adaptation_table(result),
        "",
        "## Per collection, at the transferred threshold",
        "",
        *per_source_table(held_out_per_collection(result)),
        "",
    ]
    return "\n".join(lines)


def provenance_lines(model: str, run_id: str, commit: str, data: str, date: str) -> list[str]:
    """Markdown: which model this card describes and where it came from."""
    return [
        "| model | MLflow run | git commit | data version | date |",
        "|---|---|---|---|---|",
        f"| {model} | {run_id} | {commit} | {data} | {date} |",
        "",
    ]


def study_lines(study: dict | None) -> list[str]:
    """What the study showed (reports/study/study.json, the study stage's; None: not run yet): the
    recipes compared, per held-out group each one's AUC difference from the baseline with its paired
    interval, and how many qualify by the selection rule (saying so when none does)."""
    lines = ["## What the study showed: recipes compared on the same held-out sites", ""]
    if not study:
        return [*lines, "No study yet (reports/study/study.json): `dvc repro study` compares the recipes.", ""]
    base, verdicts = study["baseline"], study["verdicts"]
    qualified = [name for name, v in verdicts.items() if v["qualifies"]]
    names = ", ".join(r["recipe"] for r in study["rows"])
    lines += [
        f"{len(study['rows'])} recipes through leave-one-collection-out on the same groups, each against {base} "
        f"per group, paired (the same patient-bootstrap resamples score both): {names}.",
        "",
        f"**{len(qualified)} of {len(verdicts)} qualif{'ies' if len(qualified) == 1 else 'y'} by the selection rule**"
        + (f" ({', '.join(qualified)})." if qualified else f": none does, {base} stays the default."),
        "",
        "| recipe | held-out group | counted | ΔAUC vs " + base + " [95% CI] |",
        "|---|---|---|---|",
    ]
    for recipe, per_group in study["deltas"].items():
        for group, d in per_group.items():
            cell = f"{fmt(d['delta'])} [{fmt(d['low'])}, {fmt(d['high'])}]"
            lines.append(f"| {recipe} | {group} | {'yes' if d['counted'] else 'no (class is collection)'} | {cell} |")
    rule = study.get("rule", "")
    return [*lines, "", f"Selection rule: {rule}. The whole study: [study/report.md](study/report.md).", ""]


def stamped(card_md: str, lines: list[str]) -> str:
    """The card with the provenance table under its title (the first line)."""
    title, _, rest = card_md.partition("\n")
    return "\n".join([title, "", *lines]) + rest


def model_card(
    meta: dict,
    roles_line: str,
    loco: dict,
    cv: dict | None,
    test: dict | None,
    internal: dict,
    probes: dict,
    k: int,
    ci: float,
    data: list[str] = (),
    study: dict | None = None,
) -> str:
    """reports/model_card.md: what the study showed (study_lines), LOCO, then internal figures, per
    collection, probes and limits."""
    lines = [
        "# COVID-19 chest X-ray classifier: model card",
        "",
        "**A research tool, not a diagnostic device.** Do not use it for clinical decisions.",
        "",
        "The copy of this card logged to the model's MLflow training run (artifact `model_card.md`) names the "
        "registered version, the run, the git commit, the data version and the date.",
        "",
        f"Model `{meta.get('model', 'n/a')}`, {meta['image_size']} px, classes {', '.join(meta['classes'])}; "
        f"collections: {roles_line}; threshold {fmt(meta.get('threshold'))} ({meta.get('threshold_method')}"
        + (", site-calibrated" if meta.get("site_calibration") else "")
        + ").",
        "",
        *study_lines(study),
        "## At a site it never saw: leave-one-collection-out",
        "",
        "Only these figures say something about other hospitals. Each held-out collection plays a hospital the "
        "recipe never saw; the model shipped is the same recipe trained on every collection.",
        "",
        *loco_table(loco, k),
        *loco_notes(loco, k, ci),
        "",
        "A threshold chosen at one site does not carry to another: set it on a few labelled local images with "
        "`covidxray calibrate SET --model models/model.keras --out DIR`.",
        "",
        "## Internal figures (held-out patients of the training collections)",
        "",
        "They include whatever tells the training collections apart, and say little about other sites.",
        "",
        *internal_table(cv, test),
        "",
        "## Per collection",
        "",
        *per_source_table({"internal test": internal, **held_out_per_collection(loco)}),
        "",
        "## Shortcut probes of the final model",
        "",
        *probe_lines(probes),
        *data,
        "## Details",
        "",
        "- leave-one-collection-out: [loco/report.md](loco/report.md), loco/details.json",
        "- internal test report: [report.md](report.md) (metrics with intervals, ROC, PR, calibration, "
        "Grad-CAM, the curation audit's warnings)",
        "- curation audit: data/curated/audit.md",
        "",
    ]
    return "\n".join(lines)
