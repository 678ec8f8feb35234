"""Model metadata and the weights file format.

Each model is two files in one folder: `<name>.json` (this metadata) and
`<name>.weights.npz` (the weights, in `model.weights` order). Workers put `name` and
`version` into the DICOM AlgorithmIdentificationSequence (PS3.3 C.17.6.1.1) and derive
UIDs from them, so a retrained model must get a new version.

Weights are stored as npz rather than Keras' .weights.h5 so that they can be kept as
float16 (the 7.7M-parameter U-Net is 31 MB in float32, over our 20 MB limit) and loaded
without pickle.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_NAME = "pneumonia-triage"
SEGMENTER_NAME = "lung-seg"


@dataclass
class ModelMetadata:
    """What a consumer needs to run, identify and trust a model."""

    name: str
    version: str
    task: Literal["classification", "segmentation"]
    input_size: int
    architecture: dict[str, Any]
    class_names: list[str]
    decision_threshold: float
    weights_file: str
    weights_sha256: str
    weights_dtype: str
    temperature: float = 1.0
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: Segmentation: the mask post-processing rule (`models.postprocess.PostProcess`), empty
    #: for none. Part of the model's output, so changing it changes the version.
    postprocess: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> "ModelMetadata":
        return cls(**json.loads(path.read_text()))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata_path(weights_dir: Path | None, name: str) -> Path:
    return (weights_dir or SHIPPED_DIR) / f"{name}.json"


def save_weights(model: Any, path: Path, dtype: str = "float32") -> str:
    """Write all model variables (trainable and BN statistics) as npz; return its sha256."""
    arrays = {f"w{i:04d}": np.asarray(v).astype(dtype) for i, v in enumerate(model.get_weights())}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return sha256_of(path)


def load_weights(model: Any, path: Path, expected_sha256: str | None = None) -> None:
    """Set model variables from an npz written by `save_weights`, checking integrity first."""
    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
        raise ValueError(f"{path.name}: sha256 does not match its metadata")
    with np.load(path, allow_pickle=False) as data:
        arrays = [data[f"w{i:04d}"] for i in range(len(data.files))]
    targets = model.get_weights()
    if len(arrays) != len(targets):
        raise ValueError(f"{path.name}: {len(arrays)} arrays, model has {len(targets)}")
    model.set_weights([a.astype(t.dtype) for a, t in zip(arrays, targets, strict=True)])


def write_model(model: Any, meta: ModelMetadata, out_dir: Path) -> ModelMetadata:
    """Save weights and metadata (filling in file name and sha256) into `out_dir`."""
    weights = out_dir / f"{meta.name}.weights.npz"
    meta.weights_file = weights.name
    meta.weights_sha256 = save_weights(model, weights, meta.weights_dtype)
    metadata_path(out_dir, meta.name).write_text(meta.to_json())
    return meta
