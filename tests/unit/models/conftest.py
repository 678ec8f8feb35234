"""Fixtures for the model tests: paths into ../shared/data and small fixed data slices."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT.parent / "shared" / "data"
PNEUMONIA = DATA / "cxr-pneumonia"
LUNGS = DATA / "cxr-lungs"


@pytest.fixture(scope="session")
def pneumonia_dir() -> Path:
    if not PNEUMONIA.is_dir():
        pytest.skip(f"shared data not found at {PNEUMONIA}")
    return PNEUMONIA


@pytest.fixture(scope="session")
def lungs_dir() -> Path:
    if not LUNGS.is_dir():
        pytest.skip(f"shared data not found at {LUNGS}")
    return LUNGS


@pytest.fixture(scope="session")
def val_slice(pneumonia_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed slice of val/: the first 20 NORMAL and 20 PNEUMONIA by sorted name (symlinks)."""
    out = tmp_path_factory.mktemp("val_slice")
    for cls in ("NORMAL", "PNEUMONIA"):
        (out / cls).mkdir()
        for src in sorted((pneumonia_dir / "val" / cls).iterdir())[:20]:
            (out / cls / src.name).symlink_to(src)
    return out
