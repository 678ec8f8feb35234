"""`triage-node model ...` commands: JSON keys, and no TensorFlow at import time."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from models.cli import app

CLASSIFIER_KEYS = {
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "kappa",
    "confusion_matrix",
    "n",
}


def test_cli_module_does_not_import_tensorflow() -> None:
    code = "import sys, models.cli; assert 'tensorflow' not in sys.modules, 'tf imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_evaluate_pneumonia_json(val_slice: Path) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", "pneumonia", "--data", str(val_slice), "--json", "--bootstrap", "20"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report.keys() >= CLASSIFIER_KEYS
    assert report["n"] == 40
    assert sum(map(sum, report["confusion_matrix"])) == 40


def test_evaluate_lungs_json(lungs_dir: Path, tmp_path: Path) -> None:
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for src in sorted((lungs_dir / sub).iterdir())[:2]:
            (tmp_path / sub / src.name).symlink_to(src)
    result = CliRunner().invoke(
        app, ["evaluate", "lungs", "--data", str(tmp_path), "--json", "--bootstrap", "20"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"dice", "iou", "n"} <= report.keys() and report["n"] == 2


def test_evaluate_pneumonia_report_split_scores_only_the_report_half(pneumonia_dir: Path) -> None:
    """The split is defined on the whole `val/` folder (a subset would split differently)."""
    result = CliRunner().invoke(
        app,
        [
            *("evaluate", "pneumonia", "--data", str(pneumonia_dir / "val")),
            *("--split", "report", "--json", "--bootstrap", "20"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "report"
    # 59 NORMAL + 88 PNEUMONIA images (108 patients) of the 310 in val/.
    assert report["n"] == 147
    assert sum(report["confusion_matrix"][0]) == 59
    # CIs resample the 108 patients (107 units: two NORMAL "patients" share a byte-identical
    # image), not the 147 images.
    assert report["bootstrap"]["unit"] == "patient" and report["bootstrap"]["units"] == 107


def test_train_adapt_needs_init_weights(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            *("train", "pneumonia", "--data", str(tmp_path)),
            *("--out", str(tmp_path), "--adapt", str(tmp_path)),
        ],
    )
    assert result.exit_code != 0


def test_card_table_names_the_bootstrap_unit() -> None:
    from models.card import metrics_table

    report = {
        "accuracy": 0.9,
        "ci95": {"accuracy": (0.8, 0.95)},
        "n": 10,
        "bootstrap": {"unit": "patient", "units": 7},
    }
    assert "95% CI (bootstrap over patients)" in metrics_table(report)
