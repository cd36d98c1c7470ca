"""The model card (reports/model_card.md): what a model does on collections it never saw, first.

It opens with one table, internal cross-validation, internal test and external set side by side
with the gap, then the figures per source (sensitivity per covid collection, specificity per
other collection) and the shortcut probes, and points to the detailed internal test report
(reports/report.md) and external report (reports/external/report.md).
"""

from __future__ import annotations

from covidxray.evaluation.report import fmt

HEADLINE = ("auc", "sensitivity", "specificity")


def _cell(figures: dict, key: str) -> str:
    value = figures.get(key)
    lo, hi = figures.get(f"{key}_ci_low"), figures.get(f"{key}_ci_high")
    return fmt(value) if lo is None or hi is None else f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def _gap(external: dict, test: dict, key: str) -> str:
    a, b = external.get(key), test.get(key)
    return "n/a" if a is None or b is None else f"{a - b:+.3f}"


def comparison_table(cv: dict | None, test: dict | None, external: dict, ci: float) -> list[str]:
    """Markdown: internal CV (mean ± sd over folds; out-of-fold sensitivity/specificity), internal
    test and external figures with intervals, and external minus internal test."""
    cv, test = cv or {}, test or {}
    t, e = test.get("test", {}), external.get("external", {})
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
    lines.append(
        f"| **external** | {external.get('n_external_images')} | "
        + " | ".join(f"**{_cell(e, k)}**" for k in HEADLINE)
        + " |"
    )
    if t:
        lines.append("| gap (external - internal test) | | " + " | ".join(_gap(e, t, k) for k in HEADLINE) + " |")
    lines += [
        "",
        f"Intervals: {ci:.0%} patient-bootstrap. Sensitivity and specificity at the saved threshold "
        f"{fmt(external.get('threshold'))}, chosen on the out-of-fold CV predictions.",
    ]
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


def model_card(
    meta: dict,
    roles_line: str,
    cv: dict | None,
    test: dict | None,
    external: dict,
    per_source: dict,
    probes: dict,
    dropped: int,
    ci: float,
    data: list[str] = (),
) -> str:
    """reports/model_card.md: the comparison first, then per-source figures, probes and limits."""
    lines = [
        "# COVID-19 chest X-ray classifier: model card",
        "",
        "**A research tool, not a diagnostic device.** Do not use it for clinical decisions.",
        "",
        f"Model `{meta.get('model', 'n/a')}`, {meta['image_size']} px, classes {', '.join(meta['classes'])}; "
        f"collections: {roles_line}.",
        "",
        "## Internal vs external: the headline",
        "",
        "The external set is collections the model never saw in training; only its figures say something "
        "about other hospitals. Internal figures come from held-out patients of the training collections and "
        "include whatever tells those collections apart.",
        "",
        *comparison_table(cv, test, external, ci),
        "",
        f"External images that near-duplicate a training image were dropped: {dropped}.",
        "",
        "## Per source",
        "",
        *per_source_table(per_source),
        "",
        "## Shortcut probes",
        "",
        *probe_lines(probes),
        *data,
        "## Details",
        "",
        "- internal test report: [report.md](report.md) (metrics with intervals, ROC, PR, calibration, "
        "Grad-CAM, the curation audit's warnings)",
        "- external report: [external/report.md](external/report.md) (the same figures on the external set)",
        "- curation audit: data/curated/audit.md",
        "",
    ]
    return "\n".join(lines)
