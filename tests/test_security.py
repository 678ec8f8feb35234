"""Security checks in CI: bandit on the code, a secret scan of the repository, pip-audit.

Each runs the real tool. The dependency audit needs a vulnerability service (the PyPI
JSON API); it is skipped, with the reason, only when that service cannot be reached or
knows none of the installed versions, never passed without having looked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYPI = "https://pypi.org/pypi/pip/json"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bandit_finds_nothing() -> None:
    """Findings are fixed, or marked ``# nosec <id>`` with the reason; skips in pyproject."""
    run = _run(
        "bandit", "-q", "-c", "pyproject.toml", "-r", "node", "workers", "models", "-f", "json"
    )
    report = json.loads(run.stdout)
    issues = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
    ]
    assert not issues, "bandit:\n" + "\n".join(issues)
    assert not report["errors"], report["errors"]
    assert report["metrics"]["_totals"]["loc"] > 1000  # it really read the code


def _key(filename: str, secret: dict[str, object]) -> tuple[str, str, str]:
    return filename, str(secret["type"]), str(secret["hashed_secret"])


def test_no_new_secrets_in_tracked_files() -> None:
    """``detect-secrets`` over git-tracked files finds only what the baseline holds as audited.

    A new finding fails: remove the secret, or audit it (``detect-secrets audit
    .secrets.baseline``) and commit the baseline with it marked a false positive.
    """
    baseline = json.loads((ROOT / ".secrets.baseline").read_text())
    known = {_key(f, s) for f, found in baseline["results"].items() for s in found}
    unaudited = [
        f"{f}:{s['line_number']} {s['type']}"
        for f, found in baseline["results"].items()
        for s in found
        if s.get("is_secret") is not False
    ]
    assert not unaudited, f"baseline entries not audited as false positives: {unaudited}"

    # Not findings by construction: the baseline holds the hashes of what it records, and
    # the weights' metadata holds their sha256 digests (one more with each model version).
    run = _run(
        "detect-secrets",
        "scan",
        "--exclude-files",
        r"^(\.secrets\.baseline|models/weights/[^/]+\.json)$",
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    current = json.loads(run.stdout)["results"]
    new = [
        f"{f}:{s['line_number']} {s['type']}"
        for f, found in current.items()
        for s in found
        if _key(f, s) not in known
    ]
    assert not new, "possible secrets committed (not in .secrets.baseline):\n" + "\n".join(new)


def test_dependencies_have_no_known_vulnerabilities(tmp_path: Path) -> None:
    try:
        urllib.request.urlopen(PYPI, timeout=15).close()
    except (urllib.error.URLError, TimeoutError) as exc:
        pytest.skip(f"vulnerability service unreachable ({PYPI}: {exc}); dependencies NOT audited")
    out = tmp_path / "audit.json"
    run = _run(
        "pip-audit",
        "-l",
        "--skip-editable",
        "--progress-spinner",
        "off",
        "-f",
        "json",
        "-o",
        str(out),
        timeout=300,
    )
    assert out.exists(), run.stderr
    dependencies = json.loads(out.read_text())["dependencies"]
    vulnerable = [
        f"{d['name']} {d['version']}: {[v['id'] for v in d['vulns']]}"
        for d in dependencies
        if d.get("vulns")
    ]
    assert not vulnerable, "known vulnerabilities:\n" + "\n".join(vulnerable)
    assert run.returncode == 0, run.stderr
    not_found = [d["name"] for d in dependencies if "not found on PyPI" in d.get("skip_reason", "")]
    audited = [d for d in dependencies if "skip_reason" not in d]
    if not audited:
        pytest.skip(
            f"the vulnerability service knows none of the {len(not_found)} installed "
            "versions (a PyPI mirror without vulnerability data?); dependencies NOT audited"
        )
    assert not not_found, f"could not be audited (not on PyPI): {not_found}"
