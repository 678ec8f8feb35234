"""Project hygiene that CI must enforce: lint, types, and unambiguous import names."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "workers", "models")


def test_import_names_are_ours_alone() -> None:
    """node/, workers/ and models/ are generic names: no other installed distribution may provide them.

    The project installs into its own .venv; this test (and the README) make a
    collision loud instead of silently importing someone else's package.
    """
    owners = importlib.metadata.packages_distributions()
    for name in PACKAGES:
        module = importlib.import_module(name)
        assert Path(module.__file__ or "").resolve().is_relative_to(ROOT), (
            f"{name} imported from elsewhere"
        )
        others = [d for d in owners.get(name, []) if d != "triage-node"]
        assert not others, f"distributions {others} also install a top-level '{name}' package"


def test_ruff_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *PACKAGES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:]


def test_node_process_never_imports_tensorflow() -> None:
    """The DICOM and web processes must not pay for TensorFlow (2-4 s, ~0.5 GB)."""
    code = (
        "import sys, node.cli, node.runtime, node.web.app\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


BENCHMARKS = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("script", BENCHMARKS)
def test_each_benchmark_starts_as_the_readme_runs_it(script: str) -> None:
    """`.venv/bin/python bench/<script> --help` from the repository root: the imports
    (the tests' helpers included) resolve, so the one-command benchmarks stay runnable."""
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
