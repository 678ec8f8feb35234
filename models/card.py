"""Markdown tables for model cards, rendered from evaluation reports (`models.report`).

Cards are written by hand around these tables, so a retrained model's numbers are pasted
from `triage-node model evaluate ... --markdown`, never retyped.
"""

from typing import Any

LABELS = {
    "accuracy": "Accuracy",
    "auc": "ROC AUC",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "kappa": "Cohen's kappa",
    "dice": "Dice",
    "iou": "IoU (Jaccard)",
}


def metrics_table(report: dict[str, Any]) -> str:
    """Metric | value | 95% bootstrap CI."""
    unit = report.get("bootstrap", {}).get("unit")
    header = f"95% CI (bootstrap over {unit}s)" if unit else "95% CI (bootstrap)"
    lines = [f"| Metric | Value | {header} |", "|---|---:|---:|"]
    for key, (lo, hi) in report["ci95"].items():
        lines.append(f"| {LABELS.get(key, key)} | {report[key]:.4f} | {lo:.4f} - {hi:.4f} |")
    if "confusion_matrix" in report:
        (tn, fp), (fn, tp) = report["confusion_matrix"]
        lines.append(f"| Confusion matrix | TN {tn}, FP {fp}, FN {fn}, TP {tp} | |")
    lines.append(f"| n | {report['n']} | |")
    return "\n".join(lines)


def reliability_table(report: dict[str, Any]) -> str:
    """Brier score, ECE and the reliability table of P(pneumonia)."""
    cal = report["calibration"]
    lines = [
        f"Brier score {cal['brier']:.4f}, expected calibration error (10 bins) {cal['ece']:.4f}.",
        "",
        "| P(pneumonia) bin | n | mean predicted | observed pneumonia rate |",
        "|---|---:|---:|---:|",
    ]
    for row in cal["reliability"]:
        lines.append(
            f"| {row['bin_low']:.1f}-{row['bin_high']:.1f} | {row['n']} | "
            f"{row['mean_predicted']:.3f} | {row['observed']:.3f} |"
        )
    return "\n".join(lines)


def per_image_table(report: dict[str, Any]) -> str:
    lines = ["| Image | Dice | IoU |", "|---|---:|---:|"]
    for name, row in report["per_image"].items():
        lines.append(f"| {name} | {row['dice']:.4f} | {row['iou']:.4f} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """All tables of one report, in card order."""
    parts = [metrics_table(report)]
    if "calibration" in report:
        parts.append(reliability_table(report))
    if "per_image" in report:
        parts.append(per_image_table(report))
    return "\n\n".join(parts) + "\n"
