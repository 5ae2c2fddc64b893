"""Every ```bash and ```python block of docs/guide.md runs, in order, in one scratch folder with a
small photos/ ImageFolder; the itae-* commands get a tiny random model instead of a download
(tests/docs_shim.py). A block whose first line is ``# needs: internet`` or ``# needs: gpu`` is
skipped, with the reason."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import imagefolders as datasets
import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
SHIM = Path(__file__).resolve().parent / "docs_shim.py"
NEEDS = re.compile(r"^#\s*needs:\s*(\w+)")


def snippets(path: Path = GUIDE) -> list[tuple[str, str]]:
    """(language, code) of every ```bash / ```python block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", path.read_text(), re.S | re.M)]


BLOCKS = snippets()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("guide")
    datasets.fashion_folder(work / "photos", per_class=8, classes=3)
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    for cmd in ("itae-export", "itae-validate", "itae-cluster", "itae-inspect", "itae-models"):
        p = bin_dir / cmd
        p.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SHIM}" {cmd} "$@"\n')
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ITAE_DOCS_WEIGHTS_DIR": str(work),
           "ITAE_EXPORT_DIR": str(work / "exported"), "OMP_NUM_THREADS": "2"}
    return work, env


def test_the_guide_has_snippets_of_every_step():
    text = GUIDE.read_text()
    for cmd in ("itae-inspect", "itae-export", "itae-validate", "itae-cluster", "--k auto", "cudnn"):
        assert cmd in text, cmd
    assert sum(lang == "python" for lang, _ in BLOCKS) >= 3 and sum(lang == "bash" for lang, _ in BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{lang}" for i, (lang, _) in enumerate(BLOCKS)])
def test_guide_snippet_runs(workspace, index):
    work, env = workspace
    lang, code = BLOCKS[index]
    need = NEEDS.match(code)
    if need:
        pytest.skip(f"docs/guide.md block {index} needs {need.group(1)}")
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"block {index} ({lang}) failed:\n{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
