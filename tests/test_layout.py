"""The floor plan: light imports, no cycles, a README whose layout and Python API match the code."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from tiny import random_model

from itae_export.registry import get_model_spec

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "onnxruntime", "onnx")


def test_import_and_every_help_load_neither_torch_nor_onnxruntime():
    modules = sorted({target.split(":")[0] for target in SCRIPTS.values()})
    code = ("import sys, importlib, itae_export\n"
            f"for m in {modules!r}:\n"
            "    cmd = importlib.import_module(m).main\n"
            "    try:\n"
            "        cmd.main(['--help'], standalone_mode=False)\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print('HEAVY', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]


def test_no_import_cycle_and_no_hidden_own_imports():
    tool = ROOT.parent / "shared" / "tools" / "check_imports.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not beside this checkout")
    proc = subprocess.run([sys.executable, str(tool), "itae_export"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"0 cycles; 0 of the package's own imports inside functions", proc.stdout), proc.stdout


def _layout_table() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout"):readme.index("**Why `cli/` cannot clash")]


def test_readme_layout_table_matches_the_tree():
    table = _layout_table()
    for row in re.findall(r"^\| `(itae_export/[^`]*)`", table, re.M):
        assert (ROOT / row).exists(), f"README layout names {row}, which does not exist"
    pkg = ROOT / "itae_export"
    for path in sorted(pkg.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(pkg)
        assert f"`{rel.stem}`" in table or f"`{rel.name}`" in table or f"itae_export/{rel.as_posix()}" in table, (
            f"itae_export/{rel.as_posix()} is missing from the README's layout table")


def test_architecture_doc_names_every_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert "```mermaid" in doc
    for sub in sorted(p.name for p in (ROOT / "itae_export").iterdir() if (p / "__init__.py").is_file()):
        assert f"itae_export/{sub}/" in doc, sub


@pytest.mark.slow
def test_readme_python_api_runs(tmp_path, monkeypatch):
    """The README's snippet, verbatim, on a random-weight ViT-S/14-reg in the official DINOv2 format."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    spec = get_model_spec("vits14_reg")
    torch.save(random_model(spec, seed=0).state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    Image.fromarray(load_sample_image("china.jpg")).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(snippet, "README.md", "exec"), env)  # noqa: S102 - the README's own code
    assert (tmp_path / "vits14_reg.onnx").is_file() and env["result"].validation["passed"]
    emb = env["features"]["embedding"].numpy()
    assert np.abs(env["onnx_out"]["embedding"] - emb).max() <= 1e-4 * np.abs(emb).max()
