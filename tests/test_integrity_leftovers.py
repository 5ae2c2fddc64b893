"""Leftovers of issue 22: --k auto on identical images and on two images, and session files whose
query vector is not numbers, NaN or zero: one line each, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from itae_export.cli.cluster import main as cluster_cli
from itae_export.cluster.evaluation import choose_k
from itae_export.errors import InputError
from itae_export.search.index import SearchIndex
from itae_export.search.session import Session, new_session


def _one_line(res, code, *needles, absent=()):
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output
    for n in absent:
        assert n not in errors[0], res.output


def _folder(root, n, same: bool):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        px = np.full((40, 40, 3), 120, np.uint8) if same else rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(px).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("criterion", ["silhouette", "eigengap"])
def test_k_auto_on_identical_images(tiny_model, tmp_path, criterion):
    root = _folder(tmp_path / "same", 6, same=True)
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "auto", "--k-criterion", criterion, "--onnx",
                                           str(tiny_model), "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"])
    _one_line(res, 1, "--k auto", "1 distinct embedding", "--k N")


def test_k_auto_on_two_images_names_no_k_never_typed(tiny_model, tmp_path):
    root = _folder(tmp_path / "two", 2, same=False)
    res = CliRunner().invoke(cluster_cli, [str(root), "--k", "auto", "--onnx", str(tiny_model), "--out",
                                           str(tmp_path / "out"), "--quiet", "--workers", "1"])
    _one_line(res, 1, "--k auto needs at least 3 images", "not 2", absent=("--k: 1", "k=1", "--k 1"))


def test_choose_k_with_few_distinct_points():
    x = np.repeat(np.eye(4, dtype=np.float32)[:3], 5, axis=0)  # 15 points, 3 distinct
    best, curve = choose_k(x, range(2, 8))
    assert set(curve) == {2} and best == 2  # no k with more clusters than distinct points
    with pytest.raises(InputError, match="only 2 distinct"):
        choose_k(np.repeat(np.eye(4, dtype=np.float32)[:2], 5, axis=0), range(2, 5))
    bad = np.eye(6, dtype=np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="not finite"):
        choose_k(bad, range(2, 4))


# ---------------------------------------------------------------- session vectors


@pytest.fixture()
def index(tmp_path):
    v = np.eye(4, dtype=np.float32)
    return SearchIndex(tmp_path, [f"{i}.png" for i in range(4)], v, "sha256:" + "c" * 64)


@pytest.mark.parametrize("vector,needle", [
    (["a", "b", "c", "d"], "numbers"), ([1, 2, "x", 4], "numbers"), ([None, 0, 0, 0], "numbers"),
    ([True, 0, 0, 0], "numbers"), ("1234", "list"), ({"a": 1}, "list"), ([], "list"),
    ([float("nan"), 0, 0, 0], "finite"), ([1e400, 0, 0, 0], "finite"), ([0, 0, 0, 0], "zero"),
    ([1, 0, 0], "dimension"), ([[1, 0, 0, 0]], "numbers"),
])
def test_a_bad_session_vector_is_one_line(index, tmp_path, vector, needle):
    good = new_session(index, tmp_path, {"kind": "like", "value": "0.png"}, index.vectors[0], index.model_id, k=2)
    path = tmp_path / "session.json"
    good.save(path)
    data = json.loads(path.read_text())
    data["vector"] = vector
    text = json.dumps(data).replace("Infinity", "1e400")
    path.write_text(text)
    with pytest.raises(InputError, match=needle) as e:
        s = Session.load(path)
        s.check(index)
    assert "--session" in str(e.value) or "session" in str(e.value)


@pytest.mark.parametrize("vector", [np.zeros(4), np.array([np.nan, 0, 0, 1.0]), np.array([np.inf, 0, 0, 0])])
def test_a_bad_query_vector_starts_no_session(index, tmp_path, vector):
    with pytest.raises(InputError, match="query"):
        new_session(index, tmp_path, {"kind": "like", "value": "0.png"}, vector, index.model_id)


@pytest.mark.parametrize("field,value", [("judgments", {"0.png": "yes"}), ("judgments", []), ("k", "20"),
                                         ("k", 0), ("query", "x"), ("rounds", {}), ("method", 3)])
def test_other_bad_session_fields_are_one_line(index, tmp_path, field, value):
    good = new_session(index, tmp_path, {"kind": "like", "value": "0.png"}, index.vectors[0], index.model_id, k=2)
    path = tmp_path / "session.json"
    good.save(path)
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(InputError):
        Session.load(path)
