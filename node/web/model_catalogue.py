"""The models this node runs: metadata read as JSON and model cards as text.

Reading ``<name>.json`` directly (not through the workers' model loader) keeps
TensorFlow out of the web process.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from models import registry

CARDS_DIR = Path(registry.__file__).resolve().parent / "cards"


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str
    input_size: int | None
    class_names: list[str]
    decision_threshold: float | None
    weights_sha256: str | None
    has_card: bool
    #: Where the metadata was read from (shipped weights or the site's weights_dir).
    source: str
    #: False: an admin switched the model off and the workers skip it.
    enabled: bool = True
    #: Who switched it last, and when (UTC); None if nobody ever did.
    changed_by: str | None = None
    changed_at: datetime | None = None


def _info(path: Path, doc: dict[str, Any]) -> ModelInfo:
    name = str(doc.get("name", path.stem))
    return ModelInfo(
        name=name,
        version=str(doc.get("version", "?")),
        task=str(doc.get("task", "?")),
        input_size=doc.get("input_size"),
        class_names=[str(c) for c in doc.get("class_names", [])],
        decision_threshold=doc.get("decision_threshold"),
        weights_sha256=doc.get("weights_sha256"),
        has_card=(CARDS_DIR / f"{name}.md").is_file(),
        source=str(path.parent),
    )


def models(weights_dir: Path | None) -> list[ModelInfo]:
    """Every model with metadata in ``weights_dir`` (or the shipped folder), by name."""
    folder = weights_dir or registry.SHIPPED_DIR
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "version" in doc:
            out.append(_info(path, doc))
    return out


def card(name: str) -> str | None:
    """The model card (Markdown) of ``name``, or None."""
    if not name.replace("-", "").replace("_", "").isalnum():
        return None
    path = CARDS_DIR / f"{name}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None
