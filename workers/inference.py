"""Models in a worker process: loaded once, on the GPU when there is one, else the CPU.

TensorFlow places operations on the first GPU automatically when one is visible;
we only log which device the process got, so an admin can see it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from node.observability.metrics import INFERENCE_SECONDS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Classification:
    probabilities: NDArray[np.float32]  # (N, 2): [normal, pneumonia]
    heatmaps: list[NDArray[np.float32]]
    milliseconds: float


@dataclass(frozen=True, slots=True)
class Segmentation:
    masks: list[NDArray[np.bool_]]
    milliseconds: float


class ModelRunner:
    """The shipped models of this process; each loaded on first use."""

    def __init__(self, weights_dir: Path | None = None) -> None:
        import tensorflow as tf

        self.weights_dir = weights_dir
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        self.device = "GPU" if gpus else "CPU"
        log.info("models will run on %s", self.device)
        self._classifier: Any = None
        self._segmenter: Any = None

    @property
    def classifier(self) -> Any:
        if self._classifier is None:
            from models.inference import load_classifier
            from models.registry import CLASSIFIER_NAME

            self._classifier = _load(CLASSIFIER_NAME, lambda: load_classifier(self.weights_dir))
        return self._classifier

    @property
    def segmenter(self) -> Any:
        if self._segmenter is None:
            from models.inference import load_segmenter
            from models.registry import SEGMENTER_NAME

            self._segmenter = _load(SEGMENTER_NAME, lambda: load_segmenter(self.weights_dir))
        return self._segmenter

    def classify(self, images: Sequence[NDArray[np.float32]]) -> Classification:
        start = time.perf_counter()
        probabilities = np.asarray(self.classifier.predict(images), dtype=np.float32)
        heatmaps = [np.asarray(h, dtype=np.float32) for h in self.classifier.explain(images)]
        seconds = time.perf_counter() - start
        INFERENCE_SECONDS.labels(self.classifier.name).observe(seconds)
        return Classification(probabilities, heatmaps, seconds * 1000)

    def segment(self, images: Sequence[NDArray[np.float32]]) -> Segmentation:
        start = time.perf_counter()
        masks = [np.asarray(m, dtype=bool) for m in self.segmenter.predict(images)]
        seconds = time.perf_counter() - start
        INFERENCE_SECONDS.labels(self.segmenter.name).observe(seconds)
        return Segmentation(masks, seconds * 1000)


def _load(name: str, load: Callable[[], Any]) -> Any:
    """Load one model, telling the worker's /readyz whether it could (see workers.health)."""
    from workers.health import record_model_load

    try:
        model = load()
    except Exception as exc:
        record_model_load(name, exc)
        raise
    record_model_load(name, None)
    log.info("loaded %s %s", model.name, model.version)
    return model


@functools.cache
def runner(weights_dir: Path | None = None) -> ModelRunner:
    """The process's runner (created after the worker forks, never in the parent)."""
    return ModelRunner(weights_dir)
