"""A lungs training run can continue from earlier weights instead of starting from scratch."""

from pathlib import Path

import numpy as np

from models.architectures import build_unet
from models.registry import ModelMetadata, load_weights, metadata_path
from models.train import SEGMENTER_NAME, TrainSettings, train_segmenter

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "weights"


def _unet(weights_dir: Path, size: int = 32) -> list[np.ndarray]:
    meta = ModelMetadata.read(metadata_path(weights_dir, SEGMENTER_NAME))
    model = build_unet(size)
    load_weights(model, weights_dir / meta.weights_file, meta.weights_sha256)
    return [np.asarray(w, dtype=np.float32) for w in model.get_weights()]


def test_segmenter_continues_from_init_weights(lungs_dir: Path, tmp_path: Path) -> None:
    settings = TrainSettings(input_size=32, epochs=1, batch_size=2, learning_rate=1e-6)
    meta = train_segmenter(lungs_dir, tmp_path, settings, steps_per_epoch=1, init_weights=SHIPPED)
    assert meta.training["init_weights"].startswith("lung-seg ")
    start, after = _unet(SHIPPED), _unet(tmp_path)
    # One tiny step away from the shipped weights: the run started from them (kernels of a
    # fresh U-Net would differ by their whole magnitude).
    kernels = [(a, b) for a, b in zip(start, after, strict=True) if a.ndim == 4]
    drift = max(float(np.abs(a - b).max()) for a, b in kernels)
    scale = max(float(np.abs(a).max()) for a, _ in kernels)
    assert drift < 0.01 * scale, (drift, scale)
