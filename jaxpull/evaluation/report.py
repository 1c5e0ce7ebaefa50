"""Reports of ``jaxpull evaluate``: bootstrap intervals, paired differences, markdown and CSV.

Two layouts: the quick protocol's (one table per metric, every explainer minus the gradient)
and the paper's (explainers x metrics, means with 95% intervals, then the paired difference of
each pullback and its baseline). Intervals are percentile bootstraps of the mean over items
(images, or mosaics for Focus); a difference is paired: the same items resampled for both.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np

from jaxpull.evaluation import protocol as protocols


@dataclasses.dataclass
class Report:
    """Per-item scores ``scores[metric][explainer]`` ``(items,)``; randomisation curves
    ``curves[explainer]`` ``(stages, N)`` with ``stage_names``; the settings that made them."""

    scores: dict[str, dict[str, np.ndarray]]
    curves: dict[str, np.ndarray]
    stage_names: list[str]
    settings: dict[str, object]


def bootstrap_ci(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval of ``values`` (NaNs dropped)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = np.concatenate(
        [v[rng.integers(0, v.size, (min(1000, resamples - i), v.size))].mean(axis=1) for i in range(0, resamples, 1000)]
    )
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float, float, int]:
    """Mean of ``a - b`` over items where both are finite, its paired-bootstrap 95% interval, and the count."""
    keep = np.isfinite(a) & np.isfinite(b)
    mean, lo, hi = bootstrap_ci(a[keep] - b[keep], resamples, rng)
    return mean, lo, hi, int(keep.sum())


def verdict(diff: float, lo: float, hi: float, higher: bool) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0, else ``no clear difference``."""
    if not np.isfinite(diff):
        return ""
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == higher else "worse"
    return "no clear difference"


def to_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows of dicts (the same keys) as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def _describe(metric: protocols.Metric, settings: Mapping[str, object]) -> str:
    values = {k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()}
    try:
        return metric.description.format(**values)
    except (KeyError, IndexError):
        return metric.description


# --------------------------------------------------------------------------------------
# The quick protocol: every explainer against the gradient
# --------------------------------------------------------------------------------------


def summary_rows(report: Report, resamples: int = 2000, baseline: str = protocols.QUICK_BASELINE) -> list[dict]:
    """One row per (metric, explainer): mean and 95% CI, and the paired difference to ``baseline``."""
    rng = np.random.default_rng(int(report.settings["seed"]))
    rows = []
    for metric, per in report.scores.items():
        base = per.get(baseline)
        for name, values in per.items():
            mean, lo, hi = bootstrap_ci(values, resamples, rng)
            row = dict(
                metric=metric,
                explainer=name,
                n=int(np.isfinite(values).sum()),
                mean=mean,
                ci_low=lo,
                ci_high=hi,
                diff=float("nan"),
                diff_low=float("nan"),
                diff_high=float("nan"),
            )
            if base is not None and name != baseline:
                row["diff"], row["diff_low"], row["diff_high"], _ = paired_difference(values, base, resamples, rng)
            rows.append(row)
    return rows


def to_markdown(
    report: Report, rows: Sequence[Mapping[str, object]], command: str = "", baseline: str = protocols.QUICK_BASELINE
) -> str:
    """The quick protocol's markdown report: settings, one table per metric, the randomisation curves."""
    s = report.settings
    metric_settings = s.get("metric_settings") or protocols.quick_settings(
        0, 0, 2, int(s.get("stages", 6)), int(s.get("sensitivity_samples", 10))
    )
    lines = [f"# Evaluation of explainers on {s['arch']}", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    lines += [
        f"{s['images']} images, seed {s['seed']}, {s['mosaics']} Focus mosaics, {s['stages']} randomisation steps; "
        f"95% intervals are percentile bootstraps over items; differences to `{baseline}` are paired "
        "(the same items resampled for both).",
        "",
    ]
    if s.get("options"):
        lines += ["Explainer options: " + "; ".join(f"`{k}`: {v}" for k, v in s["options"].items()), ""]
    for metric in report.scores:
        m = protocols.QUICK.metrics[metric]
        higher = m.higher_is_better
        lines += [
            f"## {metric} ({'higher' if higher else 'lower'} is better)",
            "",
            _describe(m, metric_settings.get(metric, {})),
            "",
            f"| explainer | n | mean [95% CI] | minus {baseline} [95% CI] | vs {baseline} |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["metric"] != metric:
                continue
            diff = (
                "" if not np.isfinite(r["diff"]) else f"{r['diff']:+.4g} [{r['diff_low']:+.4g}, {r['diff_high']:+.4g}]"
            )
            lines.append(
                f"| {r['explainer']} | {r['n']} | {r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] | {diff} "
                f"| {verdict(r['diff'], r['diff_low'], r['diff_high'], higher)} |"
            )
        lines.append("")
    lines += _curves(report)
    return "\n".join(lines)


def _curves(report: Report) -> list[str]:
    if not report.curves:
        return []
    lines = [
        "## Cascading randomisation, mean Spearman r per step (top-down)",
        "",
        "| explainer | " + " | ".join(f"to {n}" for n in report.stage_names) + " |",
        "|---|" + "---|" * len(report.stage_names),
    ]
    for name, curve in report.curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in np.nanmean(curve, axis=1)) + " |")
    lines += [
        "",
        "Sanity verdict: an explainer passes when its mean correlation after randomising every "
        "layer is below 0.5 (the map depends on what the model learned).",
        "",
    ]
    for name, curve in report.curves.items():
        final = float(np.nanmean(curve[-1]))
        lines.append(f"- {name}: {final:.3f} -> {'passes' if final < 0.5 else 'FAILS'}")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# The paper's layout: explainers x metrics, then pullback - baseline
# --------------------------------------------------------------------------------------


def paper_rows(report: Report, pairs: Sequence[tuple[str, str]], resamples: int = 10000) -> list[dict]:
    """Rows ``kind="mean"`` (metric, explainer: mean and 95% CI) and ``kind="difference"`` (metric,
    pullback ``explainer`` minus ``baseline``: paired mean difference and its 95% CI), ``n`` the items."""
    rng = np.random.default_rng(int(report.settings["seed"]))
    rows = []
    for metric, per in report.scores.items():
        for name, values in per.items():
            mean, lo, hi = bootstrap_ci(values, resamples, rng)
            rows.append(
                dict(
                    kind="mean",
                    metric=metric,
                    explainer=name,
                    baseline="",
                    n=int(np.isfinite(values).sum()),
                    mean=mean,
                    ci_low=lo,
                    ci_high=hi,
                )
            )
        for a, b in pairs:
            if a in per and b in per:
                mean, lo, hi, n = paired_difference(per[a], per[b], resamples, rng)
                rows.append(
                    dict(
                        kind="difference", metric=metric, explainer=a, baseline=b, n=n, mean=mean, ci_low=lo, ci_high=hi
                    )
                )
    return rows


def fmt(x: float, signed: bool = False) -> str:
    """A table number: 3 decimals without trailing zeros, scientific beyond 1e4 or below 1e-3."""
    if not np.isfinite(x):
        return "nan"
    sign = "+" if signed and x >= 0 else ""
    if abs(x) >= 1e4 or 0 < abs(x) < 1e-3:
        return f"{sign}{x:.2e}"
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return sign + (text if text not in ("-0", "") else "0")


def paper_markdown(
    report: Report, rows: Sequence[Mapping[str, object]], command: str = "", notes: Sequence[str] = ()
) -> str:
    """The paper's layout: explainers x metrics (mean [95% CI]), then each pullback minus its
    baseline (paired mean difference [95% CI], better / worse where the interval excludes 0)."""
    s = report.settings
    metric_list = list(report.scores)
    proto = protocols.PAPER
    means = {(r["metric"], r["explainer"]): r for r in rows if r["kind"] == "mean"}
    diffs = [r for r in rows if r["kind"] == "difference"]
    arrow = lambda m: "↑" if proto.metrics[m].higher_is_better else "↓"
    head = "| explainer | " + " | ".join(f"{proto.metrics[m].title} {arrow(m)}" for m in metric_list) + " |"
    rule = "|---|" + "---|" * len(metric_list)
    lines = [f"# The paper's evaluation protocol on {s['arch']}", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    focus = f", {s['mosaics']} Focus mosaics" if "focus" in metric_list else ""
    lines += [
        f"{s['images']} images ({s['labels']} labels){focus}, seed {s['seed']}, batches of {s['batch']}"
        + (f"; pullback explainers under the `{s['rules']}` rules" if s.get("rules") else "")
        + f". Each cell: mean over items [95% percentile-bootstrap interval, {s['resamples']} resamples]; "
        "↑ higher is better, ↓ lower is better.",
        "",
    ]
    lines += list(notes) + ([""] if notes else [])
    lines += ["## Means", "", head, rule]
    for name in report.scores[metric_list[0]]:
        cells = []
        for m in metric_list:
            r = means[(m, name)]
            cells.append(f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    pair_names = list(dict.fromkeys((r["explainer"], r["baseline"]) for r in diffs))
    if pair_names:
        lines += [
            "## Pullback minus baseline (paired)",
            "",
            "Mean of the per-item difference [95% paired-bootstrap interval]; **better** / **worse** when the "
            "interval excludes 0 in that direction.",
            "",
            head.replace("| explainer |", "| pullback - baseline |"),
            rule,
        ]
        by = {(r["metric"], r["explainer"], r["baseline"]): r for r in diffs}
        for a, b in pair_names:
            cells = []
            for m in metric_list:
                r = by.get((m, a, b))
                if r is None:
                    cells.append("")
                    continue
                word = verdict(r["mean"], r["ci_low"], r["ci_high"], proto.metrics[m].higher_is_better)
                mark = f" **{word}**" if word in ("better", "worse") else ""
                cells.append(f"{fmt(r['mean'], True)} [{fmt(r['ci_low'], True)}, {fmt(r['ci_high'], True)}]{mark}")
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Metrics", ""]
    for m in metric_list:
        items = "mosaics" if proto.metrics[m].on == "mosaics" else "images"
        finite = [int(np.isfinite(v).sum()) for v in report.scores[m].values()]
        total = len(next(iter(report.scores[m].values())))
        undefined = "" if min(finite) == total else f"; undefined (NaN) scores left out: up to {total - min(finite)}"
        lines.append(
            f"- {proto.metrics[m].title}: {_describe(proto.metrics[m], s['metric_settings'][m])} "
            f"({total} {items}{undefined})."
        )
    lines.append("")
    if s.get("options"):
        lines += ["Explainer options: " + "; ".join(f"`{k}`: {v}" for k, v in s["options"].items()), ""]
    lines += _curves(report)
    return "\n".join(lines)
