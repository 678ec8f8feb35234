"""Inference benchmark: our API vs a bare `tf.function` on the same model and images.

Run as `.venv/bin/python bench/bench_inference.py`. The API time includes everything a
worker pays (validation, percentile normalisation, resize, temperature/resize-back, the
lung mask post-processing); the bare call gets the already-normalised tensor, so the ratio
is the API's total overhead. Both run the same Keras model: for pneumonia-triage 1.2.0 that
is the whole ensemble (two members, each on the image and its mirror image).
Target: ratio >= 0.9.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from models.inference import load_classifier, load_segmenter  # noqa: E402
from models.preprocess import normalize_images  # noqa: E402
from models.report import read_grayscale  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cxr-pneumonia" / "val"


def _elapsed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(
    api: Callable[[list[np.ndarray]], Any],
    model: Any,
    size: int,
    images: list[np.ndarray],
    batch: int,
    repeats: int,
) -> dict[str, tuple[float, float]]:
    """(img/s at `batch`, p50 ms at batch 1) for the API and two bare tf.function paths."""
    bare = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)],
    )
    bare_full = tf.function(
        lambda raw: model(normalize_images(raw[..., tf.newaxis], size), training=False),
        input_signature=[tf.TensorSpec([None, None, None], tf.float32)],
    )
    raw = tf.constant(np.stack(images[:batch]).astype(np.float32))
    x = normalize_images(raw[..., tf.newaxis], size)
    paths: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "API (predict)": (lambda: api(images[:batch]), lambda: api(images[:1])),
        "bare: model only": (lambda: np.asarray(bare(x)), lambda: np.asarray(bare(x[:1]))),
        "bare: normalize + model": (
            lambda: np.asarray(bare_full(raw)),
            lambda: np.asarray(bare_full(raw[:1])),
        ),
    }
    # Interleaved rounds: every path is timed once per round, so load from other processes
    # on a shared machine hits all paths alike instead of biasing whichever ran last.
    for run_batch, run_one in paths.values():
        run_batch()  # warm-up: trace/compile outside the measurement
        run_one()
    batch_t: dict[str, list[float]] = {p: [] for p in paths}
    one_t: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(repeats):
        for path, (run_batch, run_one) in paths.items():
            batch_t[path].append(_elapsed(run_batch))
            one_t[path] += [_elapsed(run_one) for _ in range(4)]
    out = {}
    for path in paths:
        out[path] = (
            batch / statistics.median(batch_t[path]),
            statistics.median(one_t[path]) * 1e3,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--classifier", type=Path, help="weights dir (default: shipped)")
    parser.add_argument("--segmenter", type=Path, help="weights dir (default: shipped)")
    args = parser.parse_args()
    files = sorted((DATA / "NORMAL").iterdir())[:16] + sorted((DATA / "PNEUMONIA").iterdir())[:16]
    images = [read_grayscale(p).astype(np.uint8) for p in files]
    clf = load_classifier(args.classifier)
    seg = load_segmenter(args.segmenter)
    results = {
        f"{clf.name} {clf.version}": bench_model(
            clf.predict, clf.model, clf.input_size, images, 32, args.repeats
        ),
        f"{seg.name} {seg.version}": bench_model(
            seg.predict, seg.model, seg.input_size, images, 4, args.repeats
        ),
    }
    table = Table(
        title=f"Inference on CPU ({os.cpu_count()} cores), 224x224 uint8 inputs, same images"
    )
    for col in ("model", "path", "img/s (batch)", "API / bare", "p50 ms (batch 1)", "bare / API"):
        table.add_column(col, justify="right")
    for name, paths in results.items():
        api_tput, api_p50 = paths["API (predict)"]
        for path, (tput, p50) in paths.items():
            is_api = path.startswith("API")
            table.add_row(
                name if is_api else "",
                path,
                f"{tput:.1f}",
                "" if is_api else f"{api_tput / tput:.2f}x",
                f"{p50:.1f}",
                "" if is_api else f"{p50 / api_p50:.2f}x",
            )
    console = Console(width=130)
    console.print(table)
    console.print(
        "ratios: API throughput / bare, bare latency / API (1.00x = no overhead; target >= 0.9x)"
    )


if __name__ == "__main__":
    main()
