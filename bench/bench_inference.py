"""Inference benchmark: our API vs a bare `tf.function` on the same model and images.

Run as `.venv/bin/python bench/bench_inference.py`. The API time includes everything a
worker pays (validation, percentile normalisation, resize, temperature/resize-back); the
bare call gets the already-normalised tensor, so the ratio is the API's total overhead.
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


def _timings(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm-up: trace/compile outside the measurement
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_model(
    name: str,
    api: Callable[[list[np.ndarray]], Any],
    model: Any,
    size: int,
    images: list[np.ndarray],
    batch: int,
    repeats: int,
) -> dict[str, Any]:
    bare = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)],
    )
    x_batch = normalize_images(
        tf.constant(np.stack(images[:batch]).astype(np.float32))[..., None], size
    )
    x_one = x_batch[:1]
    api_batch = _timings(lambda: api(images[:batch]), repeats)
    bare_batch = _timings(lambda: np.asarray(bare(x_batch)), repeats)
    api_one = _timings(lambda: api(images[:1]), repeats * 3)
    bare_one = _timings(lambda: np.asarray(bare(x_one)), repeats * 3)
    return {
        "name": name,
        "batch": batch,
        "api_tput": batch / statistics.median(api_batch),
        "bare_tput": batch / statistics.median(bare_batch),
        "api_p50": statistics.median(api_one) * 1e3,
        "bare_p50": statistics.median(bare_one) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classifier", type=Path, help="weights dir (default: shipped)")
    parser.add_argument("--segmenter", type=Path, help="weights dir (default: shipped)")
    args = parser.parse_args()
    paths = sorted((DATA / "NORMAL").iterdir())[:16] + sorted((DATA / "PNEUMONIA").iterdir())[:16]
    images = [read_grayscale(p).astype(np.uint8) for p in paths]
    clf = load_classifier(args.classifier)
    seg = load_segmenter(args.segmenter)
    rows = [
        bench_model(
            f"{clf.name} {clf.version}",
            clf.predict,
            clf.model,
            clf.input_size,
            images,
            32,
            args.repeats,
        ),
        bench_model(
            f"{seg.name} {seg.version}",
            seg.predict,
            seg.model,
            seg.input_size,
            images,
            8,
            max(2, args.repeats // 2),
        ),
    ]
    table = Table(title=f"Inference on CPU ({os.cpu_count()} cores), 224x224 uint8 inputs")
    for col in (
        "model",
        "batch",
        "API img/s",
        "bare img/s",
        "ratio",
        "API p50 ms (b=1)",
        "bare p50 ms (b=1)",
        "ratio",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["batch"]),
            f"{r['api_tput']:.1f}",
            f"{r['bare_tput']:.1f}",
            f"{r['api_tput'] / r['bare_tput']:.2f}x",
            f"{r['api_p50']:.1f}",
            f"{r['bare_p50']:.1f}",
            f"{r['bare_p50'] / r['api_p50']:.2f}x",
        )
    console = Console(width=130)
    console.print(table)
    console.print("ratio = API / bare throughput and bare / API latency (1.00x = no overhead)")


if __name__ == "__main__":
    main()
