"""Docs that hold: every fenced block of README.md and docs/*.md is either run by a test or marked
as not run with the reason; no doc names a machine's own path; install instructions work from a
clone; the GPU section names the CUDA and cuDNN majors the installed onnxruntime-gpu needs.

The marks, on the line just before a fence:

- ``<!-- not run: REASON -->``: not run, and why (a download, a GPU, a server ...);
- ``<!-- runs in tests/test_x.py -->``: that test runs it (the file must exist and name the doc);
  blocks marked ``runs in tests/test_docs_blocks.py`` are run here, in a scratch folder.

``text``, ``json`` and ``mermaid`` blocks are output or data, not code (``json`` must parse).
docs/guide.md is run block by block by tests/test_docs_snippets.py (``# needs: X`` skips one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
THIS = "tests/test_docs_blocks.py"
DATA_LANGS = {"text", "json", "mermaid"}
WHOLE_FILE_RUNNERS = {"docs/guide.md": "tests/test_docs_snippets.py"}
MARK = re.compile(r"^<!--\s*(not run|runs in)\s*:?\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass
class Block:
    doc: str      # path relative to the repository
    line: int     # of the opening fence
    lang: str
    code: str
    mark: tuple[str, str] | None  # ("not run", reason) or ("runs in", test file)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mk = MARK.match(before)
        out.append(Block(path.relative_to(ROOT).as_posix(), line, m.group(1).strip(), m.group(2),
                         (mk.group(1), mk.group(2)) if mk else None))
    return out


ALL = [b for p in DOCS for b in blocks(p)]
RUN_HERE = [b for b in ALL if b.mark == ("runs in", THIS)]


def test_blocks_are_found():
    assert len(ALL) > 50 and any(b.doc == "docs/heads.md" and b.lang == "python" for b in RUN_HERE)


def test_every_block_is_run_or_marked_not_run():
    bad = []
    for b in ALL:
        if not b.lang:
            bad.append(f"{b.where}: a fence without a language (text for output, bash/python for code)")
        elif b.lang in DATA_LANGS:
            if b.mark and b.mark[0] == "runs in":
                bad.append(f"{b.where}: a {b.lang} block cannot run")
        elif b.doc in WHOLE_FILE_RUNNERS:
            pass  # run block by block, `# needs:` skips with the reason
        elif b.mark is None:
            bad.append(f"{b.where}: a {b.lang} block that no test runs and no `<!-- not run: reason -->` marks")
        elif b.mark[0] == "not run" and len(b.mark[1]) < 10:
            bad.append(f"{b.where}: `not run` needs a reason, got {b.mark[1]!r}")
        elif b.mark[0] == "runs in":
            test = ROOT / b.mark[1]
            if not test.is_file():
                bad.append(f"{b.where}: runs in {b.mark[1]}, which does not exist")
            elif b.doc not in test.read_text():
                bad.append(f"{b.where}: {b.mark[1]} does not mention {b.doc}")
    assert not bad, "\n".join(bad)


def test_json_blocks_parse():
    for b in ALL:
        if b.lang == "json":
            json.loads(b.code)


def test_the_checker_catches_an_unmarked_block(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("a\n\n<!-- not run: needs a GPU and a driver -->\n```bash\nnvidia-smi\n```\n\n"
                   "```python\nprint(1)\n```\n")
    got = [b for b in FENCE.finditer(doc.read_text())]
    assert len(got) == 2
    text = doc.read_text()
    marks = [MARK.match(text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]) for m in got]
    assert marks[0] and marks[0].group(2) == "needs a GPU and a driver" and marks[1] is None


@pytest.mark.parametrize("block", RUN_HERE, ids=[b.where for b in RUN_HERE])
def test_doc_block_runs(block, tmp_path):
    """docs/heads.md's API quick start (and any other block marked to run here), as written."""
    argv = [sys.executable, "-c", block.code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", block.code]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "2",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, f"{block.where} failed:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ machine paths

MACHINE_PATH = re.compile(r"(?:^|[^\w.~/-])/(?:work|home|Users|root|tmp|mnt|srv)/\w|site-packages/|\b[A-Z]:\\\\\w")


def test_no_machine_path_in_any_doc():
    files = DOCS + sorted((ROOT / "examples").glob("*/*.md")) + sorted((ROOT / "examples").glob("*/*.*js")) \
        + sorted((ROOT / "examples").glob("*/*.html"))
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not bad, "\n".join(bad)


def test_machine_path_pattern():
    for s in ("of /work/wt/i14/.venv/x", "in /home/alice/photos", ".venv/lib/python3.11/site-packages/x",
              "C:\\\\Users\\\\x"):
        assert MACHINE_PATH.search(s), s
    for s in ("docs/guide.md", "--out clusters/", "http://127.0.0.1/data/x", "examples/browser/"):
        assert not MACHINE_PATH.search(s), s


# ------------------------------------------------------------------ install from a clone

def test_install_instructions_work_from_a_clone():
    """The package is not on a public index: `pip install 'itae-export[...]'` fails for everyone."""
    bad = []
    for p in DOCS:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"pip install\s+(?:-\S+\s+)*['\"]?itae-export\b", line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "install from the clone (pip install -e '.[extra]'):\n" + "\n".join(bad)
    extras = set(re.findall(r"pip install -e '\.\[(\w+)", "\n".join(p.read_text() for p in DOCS)))
    declared = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
                              .split("\n[", 1)[0], re.M))
    assert extras and extras <= declared, (extras, declared)


# ------------------------------------------------------------------ onnxruntime-gpu: pin and CUDA majors

def _elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library (what the loader must find)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit LE ELF"
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]                      # sh_link: its string table
    names = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def _ort_gpu():
    from importlib import metadata

    try:
        dist = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed")
    lib = next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == "libonnxruntime_providers_cuda.so"), None)
    if lib is None:
        pytest.skip("this onnxruntime-gpu wheel has no libonnxruntime_providers_cuda.so (not Linux?)")
    return dist, lib


def _majors(dist, lib) -> tuple[int, int]:
    cuda = {int(m.group(1)) for n in _elf_needed(lib) if (m := re.fullmatch(r"libcudart\.so\.(\d+)", n))}
    assert len(cuda) == 1, _elf_needed(lib)
    cudnn = {int(m.group(1)) for r in dist.requires or [] if (m := re.match(r"nvidia-cudnn-cu\d+\s*~=\s*(\d+)", r))}
    assert len(cudnn) == 1, dist.requires
    return cuda.pop(), cudnn.pop()


def test_elf_reader_on_a_known_library():
    import _ctypes

    needed = _elf_needed(Path(_ctypes.__file__))
    assert any(n.startswith("libc.so") for n in needed) or needed == [], needed


def test_onnxruntime_gpu_is_pinned_to_the_tested_range():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    dist, _ = _ort_gpu()
    req = [r for r in re.findall(r'"(onnxruntime-gpu[^"]*)"', (ROOT / "pyproject.toml").read_text())]
    assert len(req) == 1, req
    spec = SpecifierSet(req[0].removeprefix("onnxruntime-gpu"))
    assert any(s.operator == "<" for s in spec), f"{req[0]}: no upper bound, a new major CUDA can come in"
    assert Version(dist.version) in spec, (dist.version, req[0])


def test_gpu_docs_name_the_cuda_the_installed_wheel_needs():
    dist, lib = _ort_gpu()
    cuda, cudnn = _majors(dist, lib)
    for doc in ("README.md", "docs/guide.md"):
        text = (ROOT / doc).read_text()
        said = re.findall(r"built for CUDA (\d+) and cuDNN (\d+)", text)
        assert said and set(said) == {(str(cuda), str(cudnn))}, f"{doc} says {said}, the wheel needs CUDA {cuda}, cuDNN {cudnn}"
        libs = set(re.findall(r"lib(?:cudart|cublas|cublasLt)\.so\.(\d+)", text))
        assert libs <= {str(cuda)}, f"{doc} names CUDA {libs} libraries"
        wheels = set(re.findall(r"nvidia-[a-z-]+-cu(\d+)", text))
        assert wheels <= {str(cuda)}, f"{doc} installs cu{wheels} wheels"
    readme = (ROOT / "README.md").read_text()
    ver = ".".join(dist.version.split(".")[:2])
    assert f"onnxruntime-gpu {ver}" in readme, f"README's GPU section does not name onnxruntime-gpu {ver}"


# ------------------------------------------------------------------ the wheel

@pytest.mark.slow
def test_wheel_builds_and_installs_with_extras(tmp_path):
    """`pip wheel --no-deps .` gives a wheel with the cli subpackage and the extras, and pip
    resolves `wheel[search,scale]` against this environment (offline, --dry-run)."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy, so that the build leaves no build/ folder in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("itae_export", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("itae_export-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for must in ("itae_export/cli/cluster.py", "itae_export/cli/embed.py", "itae_export/images.py",
                 "itae_export/data/store.py", "itae_export/onnx/identity.py"):
        assert must in names, must
    assert not any(n.startswith(("cli/", "tests/")) for n in names)
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for extra in ("search", "scale", "ray", "test"):
        assert f"Provides-Extra: {extra}" in meta, extra
    ep = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "itae-cluster = itae_export.cli.cluster:main" in ep
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q",
                           f"{whl}[search,scale]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
