"""A study: recipes compared by leave-one-collection-out on the same held-out groups, judged the way
domain generalization is (DomainBed, Gulrajani & Lopez-Paz 2021): mean and worst group, and paired
per-group differences against the baseline recipe (ERM) with patient-bootstrap intervals computed on
the same resamples for both recipes, so that a gain is told from noise.

The selection rule (SELECTION_RULE; README): the default recipe changes only if a recipe's
worst-group difference interval lies above 0 and its mean over the groups the objective counts
(loco_auc_mixed_mean) does not drop. The stage (stages/study.py) runs the recipes; this module
measures and writes what they gave.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidxray.evaluation import loco
from covidxray.evaluation import metrics as M
from covidxray.evaluation import probes
from covidxray.evaluation.report import fmt
from covidxray.training import stacked_heads

SELECTION_RULE = (
    "a recipe replaces the baseline only if the paired 95% interval of its AUC difference on its worst "
    "counted group (the group where its difference is lowest, among those where class is not collection) "
    "lies above 0, and its mean AUC over those groups (loco_auc_mixed_mean) is not below the baseline's"
)
PROBE_ROWS = 2000  # the collection probe looks at most at this many images per group (a fixed sample)


# -- per recipe ---------------------------------------------------------------------------------------


def collection_probe(seed: int):
    """A loco.run `inspect`: how well the group model's head representation (its `head_dense`
    layer) tells the collections of one class apart (probes.feature_collection_aucs) on the group's
    training and held-out images: near 0.5, the representation does not encode the source."""

    def inspect(model, trainer, rows: pd.DataFrame, train_idx, held_idx) -> dict:
        idx = np.union1d(train_idx, held_idx)
        if len(idx) > PROBE_ROWS:
            idx = np.sort(np.random.default_rng(seed).choice(idx, PROBE_ROWS, replace=False))
        frame = rows.iloc[idx].reset_index(drop=True)
        if trainer.stacked_head(model) is not None:  # the trainer's pooled table: no image read again
            features = stacked_heads.hidden(stacked_heads.head_weights(model), trainer.pooled_features(model)[idx])
            return probes.collection_aucs_of(features, frame, seed)
        return probes.feature_collection_aucs(model, trainer.images[idx], frame, seed, store=trainer.store)

    return inspect


def probe_auc(result: dict) -> float | None:
    """The highest collection-probe AUC over the groups and classes of a LOCO result (None: none)."""
    found = [
        c["auc"] for g in result["groups"].values() for c in (g.get("inspected") or {}).values() if c["auc"] is not None
    ]
    return max(found) if found else None


def recipe_row(name: str, overrides, result: dict, baseline: dict) -> dict:
    """One line of the study table: LOCO mean/worst AUC (all groups with both classes, and the
    counted ones), the worst margin over the shortcut baseline, calibrated sensitivity/specificity,
    the collection probe, and the mean difference from the baseline recipe."""
    s = result["summary"]
    mixed, base = s["loco_auc_mixed_mean"], baseline["summary"]["loco_auc_mixed_mean"]
    return {
        "recipe": name,
        "overrides": " ".join(overrides) or "(none)",
        "auc_mean": s["loco_auc_mean"],
        "auc_worst": s["loco_auc_worst"],
        "auc_mixed_mean": mixed,
        "auc_mixed_worst": s["loco_auc_mixed_worst"],
        "d_mixed_mean": None if mixed is None or base is None else mixed - base,
        "margin_mean": s["loco_margin_mean"],
        "margin_worst": s["loco_margin_worst"],
        "sens_cal": s["loco_calibrated_sensitivity_mean"],
        "spec_cal": s["loco_calibrated_specificity_mean"],
        "probe_auc": probe_auc(result),
    }


# -- paired comparison ------------------------------------------------------------------------------


def paired_deltas(base: dict, other: dict, positive: str, n_resamples: int, ci: float, seed: int) -> dict:
    """Per group with both classes: AUC(other) - AUC(base) on the same held-out images, with the
    paired patient-bootstrap interval (loco.paired_auc_difference: the same resamples score both)."""
    table = loco.paired_auc_difference(base["predictions"], other["predictions"], positive, n_resamples, ci, seed)
    table = table.set_index("group")
    out = {}
    for name, g in base["groups"].items():
        if g.get("auc") is None or name not in table.index:
            continue
        row = table.loc[name]
        found = {"delta": row["delta"], "low": row["delta_ci_low"], "high": row["delta_ci_high"]}
        out[name] = {k: M.number_or_none(v) for k, v in found.items()}
        out[name] |= {"n_images": int(row["n_images"]), "counted": bool(g.get("counted"))}
    return out


def selection(row: dict, deltas: dict) -> tuple[bool, str]:
    """SELECTION_RULE applied to a recipe (its table row and paired differences): (qualifies, why)."""
    counted = {n: d for n, d in deltas.items() if d["counted"] and d["delta"] is not None}
    if not counted:
        return False, "no counted group (class is collection everywhere, or too few images): the rule cannot apply"
    worst_name = min(counted, key=lambda n: counted[n]["delta"])
    worst = counted[worst_name]
    interval = f"worst group {worst_name}: {worst['delta']:+.3f} [{worst['low']:+.3f}, {worst['high']:+.3f}]"
    if worst["low"] is None or worst["low"] <= 0:
        return False, f"{interval} includes or lies below 0"
    if row["d_mixed_mean"] is None or row["d_mixed_mean"] < 0:
        return False, f"{interval} lies above 0, but the mean drops ({fmt(row['d_mixed_mean'])})"
    return True, f"{interval} lies above 0 and the mean does not drop ({row['d_mixed_mean']:+.3f})"


def forest_table(deltas: dict) -> pd.DataFrame:
    """recipe, group, delta, low, high, counted: one row per (recipe, group) compared."""
    rows = [
        {"recipe": recipe, "group": group, **{k: d[k] for k in ("delta", "low", "high")}, "counted": d["counted"]}
        for recipe, per_group in deltas.items()
        for group, d in per_group.items()
    ]
    return pd.DataFrame(rows, columns=["recipe", "group", "delta", "low", "high", "counted"])


def forest_figure(table: pd.DataFrame, baseline: str, ci: float):
    """A forest plot: per (recipe, group) the AUC difference from the baseline and its interval;
    groups the objective does not count drawn hollow."""
    from covidxray.evaluation.figures import pyplot

    plt = pyplot()
    n = max(len(table), 1)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.35 * n))
    for i, row in enumerate(table.itertuples()):
        y = n - 1 - i
        if row.low is not None and row.high is not None and np.isfinite([row.low, row.high]).all():
            ax.plot([row.low, row.high], [y, y], color="tab:blue", lw=1.5)
        ax.plot([row.delta], [y], "o", color="tab:blue", mfc="tab:blue" if row.counted else "white")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{r.recipe} | {r.group}" for r in table.itertuples()][::-1] or [""])
    ax.set_xlabel(f"AUC minus {baseline}'s, {ci:.0%} paired patient-bootstrap interval", fontsize=9)
    ax.set_title("Per held-out group (hollow: class is collection, not counted)", fontsize=9)
    fig.tight_layout()
    return fig


# -- report -------------------------------------------------------------------------------------------


TABLE_COLUMNS = (
    ("recipe", "recipe"),
    ("auc_mixed_mean", "AUC, class not collection (mean)"),
    ("auc_mixed_worst", "(worst)"),
    ("d_mixed_mean", "Δ mean vs baseline"),
    ("auc_mean", "AUC all groups (mean)"),
    ("auc_worst", "(worst)"),
    ("margin_worst", "margin over shortcut (worst)"),
    ("sens_cal", "sens. calibrated"),
    ("spec_cal", "spec. calibrated"),
    ("probe_auc", "collection probe AUC"),
)


def _cell(v) -> str:
    return v if isinstance(v, str) else fmt(v)


def report_md(rows: list[dict], deltas: dict, verdicts: dict, baseline: str, ci: float, groups: dict) -> str:
    """report.md: the table, the paired differences per group, and the selection rule applied."""
    lines = ["# Study: recipes compared by leave-one-collection-out", ""]
    qualified = [r for r, (ok, _) in verdicts.items() if ok]
    lines.append(
        f"**Selection**: {', '.join(qualified)} qualif{'ies' if len(qualified) == 1 else 'y'} to replace {baseline}."
        if qualified
        else f"**Selection**: no recipe qualifies; {baseline} stays the default."
    )
    lines += ["", "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r[k]) for k, _ in TABLE_COLUMNS) + " |" for r in rows]
    lines += ["", f"## AUC difference from {baseline} per held-out group ({ci:.0%} paired patient bootstrap)", ""]
    lines += ["| recipe | group | counted | images | ΔAUC [CI] |", "|---|---|---|---:|---|"]
    for recipe, per_group in deltas.items():
        for group, d in per_group.items():
            cell = f"{fmt(d['delta'])} [{fmt(d['low'])}, {fmt(d['high'])}]"
            lines.append(f"| {recipe} | {group} | {'yes' if d['counted'] else 'no'} | {d['n_images']} | {cell} |")
    lines += ["", f"## Selection rule: {SELECTION_RULE}.", ""]
    lines += [
        f"- {recipe}: {'qualifies' if ok else 'does not qualify'}: {why}" for recipe, (ok, why) in verdicts.items()
    ]
    lines += ["", "Groups:"]
    lines += [f"- {name}: {g['n_images']} images; {g['counted_why']}" for name, g in groups.items()]
    lines += [
        "",
        "Recipes: " + "; ".join(f"{r['recipe']}: {r['overrides']}" for r in rows) + ". Counted groups: both classes, "
        "shortcut baseline at most loco.objective.max_shortcut_auc, at least loco.objective.min_images images. "
        "Collection probe: the highest cross-validated AUC of a logistic regression telling the collections of "
        "one class apart from the head's representation (head_dense) of each group's model.",
    ]
    return "\n".join(lines) + "\n"
