from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.api.test_files import folder_files
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_cli(folder, data_dir, checkpoint):
    env = {**os.environ, "COLBERT_SERVER_DATA_DIR": str(data_dir), "COLBERT_SERVER_CHECKPOINT": str(checkpoint)}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "ingest", str(folder), "--collection", "cli"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_ingests_a_folder_recursively_and_reports(tmp_path, checkpoint_dir):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    files = folder_files()
    for i, (name, data) in enumerate(files.items()):
        (folder / ("sub" if i % 2 else "") / name).write_bytes(data)
    (folder / "sub" / "tool.exe").write_bytes(b"MZ")
    data_dir = tmp_path / "data"
    first = run_cli(folder, data_dir, checkpoint_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "5 added, 0 unchanged, 1 refused" in first.stdout
    assert "refused sub/tool.exe: unsupported file type" in first.stdout
    second = run_cli(folder, data_dir, checkpoint_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 added, 5 unchanged, 1 refused" in second.stdout
