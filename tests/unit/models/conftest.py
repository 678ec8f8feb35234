"""Fixtures for the model tests: paths into ../shared/data and small fixed data slices."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Missing data is a broken setup, never a reason to skip: like the root ``shared_data``
# fixture (which these build on, and which fails when ../shared/data is absent), fail.


@pytest.fixture(scope="session")
def pneumonia_dir(shared_data: Path) -> Path:
    path = shared_data / "cxr-pneumonia"
    assert path.is_dir(), f"test data not found at {path} (../shared/data)"
    return path


@pytest.fixture(scope="session")
def lungs_dir(shared_data: Path) -> Path:
    path = shared_data / "cxr-lungs"
    assert path.is_dir(), f"test data not found at {path} (../shared/data)"
    return path


@pytest.fixture(scope="session")
def val_slice(pneumonia_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed slice of val/: the first 20 NORMAL and 20 PNEUMONIA by sorted name (symlinks)."""
    out = tmp_path_factory.mktemp("val_slice")
    for cls in ("NORMAL", "PNEUMONIA"):
        (out / cls).mkdir()
        for src in sorted((pneumonia_dir / "val" / cls).iterdir())[:20]:
            (out / cls / src.name).symlink_to(src)
    return out
