"""`triage-node model ...`: train and evaluate the shipped models.

TensorFlow is imported inside the commands only, so that registering this app in the node
CLI costs nothing to commands that never touch a model.
"""

import json
import math
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Train and evaluate the triage models.", no_args_is_help=True)


class Task(StrEnum):
    pneumonia = "pneumonia"
    lungs = "lungs"


DEFAULT_SIZE = {Task.pneumonia: 128, Task.lungs: 256}
DEFAULT_BATCH = {Task.pneumonia: 32, Task.lungs: 4}


class Split(StrEnum):
    """Which part of a `val/` folder to score (`models.data.split_validation`)."""

    all = "all"
    adapt = "adapt"
    report = "report"


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@app.command()
def train(
    task: Annotated[Task, typer.Argument(help="pneumonia (classifier) or lungs (U-Net)")],
    *,
    data: Annotated[
        Path,
        typer.Option(help="pneumonia: dir with NORMAL/ PNEUMONIA/; lungs: dir with images/ masks/"),
    ],
    out: Annotated[Path, typer.Option(help="output dir for weights + metadata")],
    backbone: Annotated[
        str, typer.Option(help="cxrnet|resnet50|densenet121|efficientnetb0|mobilenetv2")
    ] = "cxrnet",
    backbone_weights: Annotated[
        Path | None, typer.Option(help="local pretrained backbone weights file")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="square input size")] = None,
    epochs: int = 50,
    batch_size: Annotated[int | None, typer.Option()] = None,
    time_budget_min: Annotated[
        float | None, typer.Option(help="stop after the epoch crossing this many minutes")
    ] = None,
    seed: int = 20240601,
    version: str = "1.0.0",
    warmup_size: Annotated[
        int | None, typer.Option(help="lungs: train first at this smaller size")
    ] = None,
    adapt: Annotated[
        Path | None,
        typer.Option(help="pneumonia: val/ dir to fine-tune on (adapt half); needs --init-weights"),
    ] = None,
    init_weights: Annotated[
        Path | None,
        typer.Option(help="weights dir to start from (pneumonia --adapt; lungs: continue a run)"),
    ] = None,
    adapt_oversample: Annotated[
        int, typer.Option(help="--adapt: repeat adapt-fit images this many times per pass")
    ] = 15,
    adapt_fold: Annotated[
        str,
        typer.Option(
            help="--adapt: a = fit adapt-fit, select on adapt-select; b = the roles swapped; "
            "with --adapt-folds K: 0..K-1, the fold selected on"
        ),
    ] = "a",
    adapt_folds: Annotated[
        int,
        typer.Option(
            help="--adapt: 0 = the fixed adapt-fit/adapt-select parts; K >= 2 = K patient-level "
            "folds over the whole adapt half"
        ),
    ] = 0,
    steps_per_epoch: Annotated[
        int, typer.Option(help="--adapt: batches between early-stopping checks")
    ] = 50,
    learning_rate: Annotated[
        float | None, typer.Option(help="default 1e-3, or 1e-4 with --adapt")
    ] = None,
    patience: Annotated[int, typer.Option(help="early-stopping patience (epochs)")] = 5,
) -> None:
    """Train a model reproducibly (fixed seed) and write weights + metadata to OUT."""
    _quiet_tf()
    from models.train import (
        AdaptSettings,
        TrainSettings,
        adapt_classifier,
        train_classifier,
        train_segmenter,
    )

    if task is Task.pneumonia and (adapt is None) != (init_weights is None):
        raise typer.BadParameter("pneumonia: --adapt and --init-weights go together")
    if task is Task.lungs and adapt is not None:
        raise typer.BadParameter("--adapt is for pneumonia only")
    settings = TrainSettings(
        input_size=input_size or DEFAULT_SIZE[task],
        epochs=epochs,
        batch_size=batch_size or DEFAULT_BATCH[task],
        seed=seed,
        time_budget_s=time_budget_min * 60 if time_budget_min else math.inf,
        learning_rate=learning_rate or (1e-4 if adapt else 1e-3),
        patience=patience,
        version=version,
    )
    if adapt is not None and init_weights is not None:
        meta = adapt_classifier(
            data,
            adapt,
            out,
            settings,
            AdaptSettings(init_weights, adapt_oversample, steps_per_epoch, adapt_fold, adapt_folds),
        )
    elif task is Task.pneumonia:
        meta = train_classifier(
            data, out, settings, backbone=backbone, backbone_weights=backbone_weights
        )
    else:
        meta = train_segmenter(
            data, out, settings, warmup_size=warmup_size, init_weights=init_weights
        )
    typer.echo(f"wrote {meta.name} {meta.version} to {out} (sha256 {meta.weights_sha256})")


@app.command()
def ensemble(
    *,
    member: Annotated[
        list[Path], typer.Option(help="stage-2 weights dir of a member (give it once per member)")
    ],
    adapt: Annotated[Path, typer.Option(help="the val/ dir the members were adapted on")],
    out: Annotated[Path, typer.Option(help="output dir for the ensemble's weights + metadata")],
    version: Annotated[str, typer.Option(help="version of the ensemble")],
    hflip_tta: Annotated[
        str,
        typer.Option(
            help="rule = flip TTA only if it lowers OOF log-loss and errors (1.2.0); on; off"
        ),
    ] = "rule",
) -> None:
    """Join cross-fitted pneumonia members into one model; threshold on out-of-fold scores."""
    _quiet_tf()
    from models.ensemble import assemble

    choices = {"rule": None, "on": True, "off": False}
    if hflip_tta not in choices:
        raise typer.BadParameter(f"--hflip-tta: one of {sorted(choices)}")
    meta, oof = assemble(member, adapt, out, version, hflip_tta=choices[hflip_tta])
    typer.echo(json.dumps(oof, indent=2))
    typer.echo(f"wrote {meta.name} {meta.version} to {out} (sha256 {meta.weights_sha256})")


@app.command()
def evaluate(
    task: Annotated[Task, typer.Argument(help="pneumonia or lungs")],
    *,
    data: Annotated[
        Path,
        typer.Option(help="pneumonia: dir with NORMAL/ PNEUMONIA/; lungs: dir with images/ masks/"),
    ],
    weights: Annotated[Path | None, typer.Option(help="weights dir (default: shipped)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON only")] = False,
    as_markdown: Annotated[
        bool, typer.Option("--markdown", help="print model-card tables")
    ] = False,
    holdout: Annotated[
        bool, typer.Option(help="lungs: only the images the model's metadata lists as held out")
    ] = False,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for 95% CIs")] = 2000,
    split: Annotated[
        Split,
        typer.Option(help="pneumonia: score all of DATA, or only its adapt/report half (val/)"),
    ] = Split.all,
) -> None:
    """Evaluate a model on a labelled folder; metrics with bootstrap 95% CIs."""
    _quiet_tf()
    from models.report import (
        evaluate_classifier_dir,
        evaluate_segmenter_dir,
        render,
    )

    if task is Task.pneumonia:
        report = evaluate_classifier_dir(
            data,
            weights,
            n_boot=bootstrap,
            show_progress=True,
            split=None if split is Split.all else split.value,
        )
    else:
        report = evaluate_segmenter_dir(
            data, weights, holdout_only=holdout, n_boot=bootstrap, show_progress=True
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif as_markdown:
        from models.card import markdown

        typer.echo(markdown(report))
    else:
        render(report)


if __name__ == "__main__":
    app()
