"""report.html from a real itae-cluster run on real images (Fashion-MNIST), checked in a real browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import imagefolders as datasets
import numpy as np
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from PIL import Image

from itae_export.cluster.report import write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_or_install_chromium() -> tuple[str | None, str]:
    """(path, why): Debian's chromium; installed with apt-get only on CI (CI=true) or when
    ITAE_ALLOW_APT=1, as root. Otherwise None and the reason to skip."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name), "found"
    allowed = os.environ.get("CI") == "true" or os.environ.get("ITAE_ALLOW_APT") == "1"
    if not allowed:
        return None, "chromium is not installed (set CI=true or ITAE_ALLOW_APT=1 to let the test apt-get it)"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "chromium is not installed and apt-get is not usable here (not Debian, or not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                ["sh", "-c", "apt-get update && apt-get install -y --no-install-recommends chromium"]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium"), "installed with apt-get"
    return None, "apt-get install chromium failed"


@pytest.fixture(scope="module")
def chromium():
    path, why = find_or_install_chromium()
    if path is None:
        pytest.skip(why)
    return path


def run_chromium(chromium: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                           *extra, url], capture_output=True, text=True, timeout=120)


def body_data(dom: str) -> dict[str, str]:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))


@pytest.fixture(scope="module")
def cluster_out(tmp_path_factory, tiny_model):
    """A real itae-cluster run (tiny exported model) with --report, on a labelled Fashion-MNIST folder."""
    base = tmp_path_factory.mktemp("report")
    root = base / "photos"
    datasets.fashion_folder(root, per_class=8, classes=6)
    (root / "sandal" / "broken.jpg").write_bytes(b"not a jpeg")  # one skipped file
    model = tiny_model
    out = base / "out"
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "6", "--onnx", str(model), "--out", str(out),
                                           "--labels-from-dirs", "--report", "--quiet", "--workers", "1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (out / "report.html").is_file()
    return out


def _rows(out: Path):
    with open(out / "assignments.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (im.format, im.size)


@pytest.mark.browser
def test_report_in_headless_chromium(cluster_out, chromium, tmp_path):
    summary = json.loads((cluster_out / "summary.json").read_text())
    url = (cluster_out / "report.html").as_uri()
    r = run_chromium(chromium, url, tmp_path / "profile", "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    data = body_data(r.stdout)
    assert data.get("checked") == "yes", data
    total = int(data["thumbs-total"])
    assert total == len(_rows(cluster_out))  # 48 images, 6 clusters: fewer than the cap of 24 each
    assert int(data["thumbs-loaded"]) == total  # every thumbnail decoded in the browser (naturalWidth > 0)
    assert data["map-loaded"] == "yes"
    k = len(summary["cluster_sizes"])
    assert int(data["clusters-shown"]) == k == summary["clustering"]["k"]
    assert re.search(rf'<span id="n-clusters">{k}</span>', r.stdout)
    sizes = [int(s) for s in re.findall(r'<section class="cluster"[^>]*data-size="(\d+)"', r.stdout)]
    assert sizes == summary["cluster_sizes"]

    shot = tmp_path / "shot.png"
    r = run_chromium(chromium, url, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1000,1400",
                     "--hide-scrollbars")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    _check_png(shot, (1000, 1400))
    a = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert a.std() > 20  # not a blank page
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200  # text, thumbnails and the map, not a flat fill

    # the check can fail: a missing thumbnail file is seen by the browser
    victim = next((cluster_out / "thumbs").glob("*.jpg"))
    saved = victim.read_bytes()
    victim.unlink()
    try:
        r = run_chromium(chromium, url, tmp_path / "profile3", "--dump-dom")
        assert int(body_data(r.stdout)["thumbs-loaded"]) == total - 1
    finally:
        victim.write_bytes(saved)


def test_report_content_offline_and_ordered(cluster_out):
    page = (cluster_out / "report.html").read_text()
    summary = json.loads((cluster_out / "summary.json").read_text())
    # self-contained: nothing fetched from the network, no data: blobs
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "@import" not in page and "data:image" not in page
    # every link resolves to a file beside the page or to an original image
    rows = _rows(cluster_out)
    hrefs = re.findall(r'<a href="([^"#]+)" title=', page)
    assert len(hrefs) == len(rows)
    for h in hrefs:
        assert (cluster_out / unquote(h)).resolve().is_file(), h
    # thumbnails of each cluster: nearest to the centroid first
    sections = re.findall(r'<section class="cluster" id="c(\d+)".*?</section>', page, flags=re.S)
    assert len(sections) == len(summary["cluster_sizes"])
    for c in range(len(sections)):
        block = re.search(rf'<section class="cluster" id="c{c}".*?</section>', page, flags=re.S).group(0)
        alts = re.findall(r'alt="([^"]+)"', block)
        expect = sorted((r for r in rows if int(r["cluster"]) == c), key=lambda r: float(r["distance"]))
        assert alts == [r["path"] for r in expect]
    for thumb in (cluster_out / "thumbs").glob("*.jpg"):
        with Image.open(thumb) as im:
            im.verify()
    with Image.open(cluster_out / "map.png") as im:
        assert im.size == (1040, 480)  # two panels: by cluster and by true label
    _check_png(cluster_out / "map.png", (1040, 480))
    # metrics and the skipped file are on the page
    assert f"{summary['metrics']['acc']:.4f}" in page
    assert "skipped.csv" in page


def _silhouette_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Written out independently of scikit-learn."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - xn @ xn.T
    s = np.zeros(len(x))
    for i in range(len(x)):
        same = (y == y[i])
        same[i] = False
        a = d[i, same].mean() if same.any() else 0.0
        b = min(d[i, y == c].mean() for c in np.unique(y) if c != y[i])
        s[i] = 0.0 if not same.any() else (b - a) / max(a, b)
    return s


def test_breakaway_count_matches_an_independent_silhouette(cluster_out):
    page = (cluster_out / "report.html").read_text()
    rows = _rows(cluster_out)
    emb = np.load(cluster_out / "embeddings.npy")
    y = np.asarray([r["label"] for r in rows])
    expect = int((_silhouette_cosine(emb.astype(np.float64), y) < 0).sum())
    m = re.search(r'<b id="n-breakaway">(\d+)</b>', page)
    assert m and int(m.group(1)) == expect


def test_report_caps_thumbnails_and_falls_back_to_pca(cluster_out, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cluster_out, out, ignore=shutil.ignore_patterns("thumbs", "report.html", "map.png", "cache"))
    path = write_report(out, max_thumbs_per_cluster=3, map_method="auto", tsne_max_points=10)
    page = path.read_text()
    assert "PCA" in page and "t-SNE would be slow" in page
    assert len(re.findall(r'<img class="thumb', page)) == 3 * len(json.loads((out / "summary.json").read_text())["cluster_sizes"])
    assert len(list((out / "thumbs").glob("*.jpg"))) == len(re.findall(r'<img class="thumb', page))


def test_report_refuses_a_folder_that_is_not_a_cluster_output(tmp_path):
    from itae_export.errors import InputError

    with pytest.raises(InputError, match="not an itae-cluster output folder"):
        write_report(tmp_path)
