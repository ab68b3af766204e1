"""Opt-in (pytest -m postgres): the tiny workflow's registry in a real PostgreSQL started by
tests/postgres/run.sh, checked against SQLite. Needs root and Debian; see the script's header."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.postgres


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None, reason="needs root on Debian")
def test_tiny_workflow_registry_in_postgresql(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "tests/postgres/run.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: the tiny workflow's registry in PostgreSQL matches SQLite" in result.stdout
