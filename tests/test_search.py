"""itae-search: the index (exact and IVF, persisted, model identity), relevance feedback, sessions,
the scriptable CLI and the server's safety rules. The browser test is in test_search_browser.py."""

from __future__ import annotations

import csv
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from itae_export.cli.search import main as search_cli
from itae_export.errors import InputError
from itae_export.search import feedback as fb
from itae_export.search.index import build_index, exact_topk, load_index, recall_at_k
from itae_export.search.server import SearchApp, check_bind, make_server
from itae_export.search.session import Session, new_session, read_feedback


def clustered(n: int, d: int, centers: int, seed: int = 0, spread: float = 0.35):
    """Unit vectors around ``centers`` random directions, and their centre labels."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    y = rng.integers(0, centers, n)
    x = c[y] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def fake_collection(out: Path, x: np.ndarray, model_id: str = "sha256:" + "a" * 64, labels=None) -> Path:
    """The three files of an itae-cluster output folder that the index reads."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", x)
    labels = labels if labels is not None else np.zeros(len(x), int)
    with open(out / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "cluster", "distance"])
        w.writerows((f"c{lab}/{i:06d}.png", 0, "0") for i, lab in enumerate(labels))
    (out / "summary.json").write_text(json.dumps({"model_id": model_id, "folder": str(out / "images"), "model": "m"}))
    return out


# ---------------------------------------------------------------- index


def test_exact_topk_matches_a_full_sort():
    x, _ = clustered(5000, 24, 7)
    q = x[:9] + 0.01
    ids, scores = exact_topk(x, q, 15, block=777)  # several blocks
    full = q @ x.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :15]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-6)


def test_exact_index_is_persisted_and_reused_and_rebuilt_when_stale(tmp_path):
    x, _ = clustered(300, 16, 4)
    out = fake_collection(tmp_path / "c", x * 3.0)  # raw embeddings are not unit vectors
    idx = build_index(out)
    assert idx.kind == "exact" and (out / "search" / "index.json").is_file()
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1, rtol=1e-5)
    logs = []
    again = load_index(out, log=logs.append)
    assert logs == [] and again.model_id == idx.model_id  # reused, not rebuilt
    # the collection is embedded again with another model: the old index is not used
    s = json.loads((out / "summary.json").read_text())
    s["model_id"] = "sha256:" + "b" * 64
    (out / "summary.json").write_text(json.dumps(s))
    with pytest.raises(InputError, match="another model"):
        load_index(out, rebuild=False)
    assert load_index(out, log=logs.append).model_id == s["model_id"] and logs


def test_ivf_index_recall_persistence_and_exclusion(tmp_path):
    pytest.importorskip("faiss", reason="the approximate index needs faiss-cpu (the search extra)")
    x, _ = clustered(20000, 32, 50, spread=0.5)
    out = fake_collection(tmp_path / "c", x)
    idx = build_index(out, kind="ivf")
    assert idx.kind == "ivf" and (out / "search" / "index.faiss").is_file()
    assert idx.info["ivf"]["build_recall_at_10"] >= 0.97
    q = x[np.random.default_rng(1).choice(len(x), 100, replace=False)]
    got, _ = idx.search(q, 10)
    truth, _ = exact_topk(idx.vectors, q, 10)
    assert recall_at_k(got, truth) >= 0.95
    again = load_index(out)  # from index.faiss
    assert again.kind == "ivf" and again.nprobe == idx.nprobe
    np.testing.assert_array_equal(again.search(q, 10)[0], got)
    excl = set(got[0][:5].tolist())
    ids, _ = again.search(q[:1], 10, exclude=excl)
    assert not excl & set(ids[0].tolist()) and (ids[0] >= 0).all()
    # feedback on the approximate index agrees with the same feedback on the exact one
    exact = load_index(out, kind="exact")
    judged = {int(i): bool(j % 3) for j, i in enumerate(got[0][:6])}
    for method in ("rocchio", "logreg"):
        a, _ = fb.rank(again, q[0], judged, 20, method)
        b, _ = fb.rank(exact, q[0], judged, 20, method)
        assert not set(a.tolist()) & set(judged) and len(a) == 20
        assert len(set(a.tolist()) & set(b.tolist())) >= 17, method
    # knn re-scores the pool of the index's neighbours of the query and the relevant images exactly
    a, sa = fb.rank(again, q[0], judged, 20, "knn")
    anchors = np.concatenate([q[:1], again.vectors[[i for i, r in judged.items() if r]]])
    pool, _ = again.search(anchors, fb.FeedbackParams().pool, exclude=set(judged))
    pool = np.unique(pool[pool >= 0])
    s = fb.knn_scores(exact.vectors[pool], anchors, exact.vectors[[i for i, r in judged.items() if not r]])
    np.testing.assert_array_equal(a, pool[np.argsort(-s, kind="stable")[:20]])
    assert not set(a.tolist()) & set(judged)


def test_model_identity_is_checked(tmp_path):
    x, _ = clustered(50, 8, 2)
    idx = build_index(fake_collection(tmp_path / "c", x))
    with pytest.raises(InputError, match="another model|holds vectors of model"):
        new_session(idx, tmp_path / "c", {"kind": "like", "value": "x"}, x[0], "sha256:" + "f" * 64)


# ---------------------------------------------------------------- feedback


def simulate(idx, x, y, qrow, method, rounds=3, k=20):
    """A simulated user: marks every shown image by its label; precision of the page after ``rounds``."""
    target = y[qrow]
    judged: dict[int, bool] = {qrow: True}
    ids, _ = fb.rank(idx, x[qrow], judged, k, method)
    for _ in range(rounds):
        assert not set(ids.tolist()) & set(judged)
        judged.update({int(i): bool(y[i] == target) for i in ids})
        ids, _ = fb.rank(idx, x[qrow], judged, k, method)
    assert len(ids) == k and not set(ids.tolist()) & set(judged)
    return float(np.mean(y[ids] == target))


@pytest.mark.parametrize("method", ["knn", "rocchio", "logreg"])
def test_feedback_raises_precision_and_never_shows_judged_images(tmp_path, method):
    # overlapping clusters: the plain ranking's next pages hold many images of other clusters
    x, y = clustered(3000, 32, 12, seed=3, spread=0.6)
    idx = build_index(fake_collection(tmp_path / "c", x, labels=y))
    queries = np.random.default_rng(0).choice(len(x), 12, replace=False)
    with_fb = np.mean([simulate(idx, x, y, int(q), method) for q in queries])
    without = np.mean([simulate(idx, x, y, int(q), "none") for q in queries])  # the same pages consumed
    assert with_fb > without + 0.05, (with_fb, without)


def test_knn_rule_is_the_documented_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    pos, neg = x[:3], x[3:5]
    for k in (1, 2):
        want = [np.sort(v @ pos.T)[-k:].mean() - np.sort(v @ neg.T)[-k:].mean() for v in x]
        np.testing.assert_allclose(fb.knn_scores(x, pos, neg, k), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fb.knn_scores(x, pos, neg[:0], 1), (x @ pos.T).max(1), rtol=1e-6)


def test_logreg_without_negatives_ranks_like_rocchio(tmp_path):
    x, _ = clustered(500, 16, 5)
    idx = build_index(fake_collection(tmp_path / "c", x))
    judged = {1: True, 2: True}
    a, _ = fb.rank(idx, x[0], judged, 15, "logreg")
    b, _ = fb.rank(idx, x[0], judged, 15, "rocchio")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="--method"):
        fb.rank(idx, x[0], judged, 15, "magic")


# ---------------------------------------------------------------- real collection, CLI, sessions


def _ranked(text: str) -> list[str]:
    return [r["path"] for r in csv.DictReader(text.splitlines())]


def test_query_by_image_file_uses_the_same_graph(collection, tmp_path):
    rows = list(csv.DictReader(open(collection / "assignments.csv")))
    root = Path(json.loads((collection / "summary.json").read_text())["folder"])
    probe = tmp_path / "probe.png"
    probe.write_bytes((root / rows[5]["path"]).read_bytes())  # the same pixels, outside the collection
    r = CliRunner().invoke(search_cli, ["query", str(collection), "--image", str(probe), "-k", "5"])
    assert r.exit_code == 0, r.output
    ranked = list(csv.DictReader(r.stdout.splitlines()))
    assert ranked[0]["path"] == rows[5]["path"] and float(ranked[0]["score"]) > 0.9999


def test_query_by_image_with_another_model_is_refused(collection, tmp_path):
    # the same graph with another preprocessing is another model (its fingerprint differs)
    import onnx

    from itae_export.onnx.contract import METADATA_KEY
    from itae_export.onnx.manifest import seal

    tiny = Path(json.loads((collection / "summary.json").read_text())["onnx"])
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(tiny))
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    manifest = json.loads(prop.value)
    manifest["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    seal(proto, manifest)  # in the graph (the authority, resealed) and beside it, consistently
    onnx.save(proto, str(other))
    other.with_suffix(".json").write_text(json.dumps(manifest))
    img = next(Path(json.loads((collection / "summary.json").read_text())["folder"]).rglob("*.png"))
    r = CliRunner().invoke(search_cli, ["query", str(collection), "--image", str(img), "--onnx", str(other)])
    assert r.exit_code == 1 and "holds vectors of model" in r.output, r.output


def test_scriptable_feedback_and_session_resume(collection, tmp_path):
    runner = CliRunner()
    like = "dress/" + _any(collection, "dress")
    first = _ranked(runner.invoke(search_cli, ["query", str(collection), "--like", like, "-k", "6", "--method",
                                              "none"]).stdout)
    assert len(first) == 6 and like not in first  # more like this one: not this one itself
    session = tmp_path / "s.json"
    fbk = tmp_path / "fb.csv"
    fbk.write_text("path,label\n" + "".join(f"{p},{'relevant' if p.startswith('dress/') else 'irrelevant'}\n"
                                            for p in first[1:4]))
    r = runner.invoke(search_cli, ["query", str(collection), "--like", like, "--feedback", str(fbk), "-k", "6",
                                   "--session", str(session), "--format", "json", "-o", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "r.json").read_text())
    shown = [e["path"] for e in out["results"]]
    assert len(shown) == 6 and not set(first[1:4]) & set(shown) and like not in shown
    saved = json.loads(session.read_text())
    assert saved["query"] == {"kind": "like", "value": like} and len(saved["judgments"]) == 3
    # resume: no query given, more judgments from a JSON file; nothing judged comes back
    fb2 = tmp_path / "fb.json"
    fb2.write_text(json.dumps({"relevant": shown[:1], "irrelevant": shown[1:3]}))
    r = runner.invoke(search_cli, ["query", str(collection), "--session", str(session), "--feedback", str(fb2)])
    assert r.exit_code == 0, r.output
    again = _ranked(r.stdout)
    judged = json.loads(session.read_text())["judgments"]
    assert len(judged) == 6 and not set(judged) & set(again)
    assert len(json.loads(session.read_text())["rounds"]) == 2
    # a session of another model's collection is refused
    saved = json.loads(session.read_text())
    saved["model_id"] = "sha256:" + "e" * 64
    session.write_text(json.dumps(saved))
    r = runner.invoke(search_cli, ["query", str(collection), "--session", str(session)])
    assert r.exit_code == 1 and "holds vectors of model" in r.output


def _any(collection, cls):
    rows = list(csv.DictReader(open(collection / "assignments.csv")))
    return next(r["path"] for r in rows if r["path"].startswith(cls + "/")).split("/", 1)[1]


def test_cli_errors_are_one_line(collection, tmp_path):
    runner = CliRunner()
    r = runner.invoke(search_cli, ["query", str(collection)])
    assert r.exit_code == 2 and "give a query" in r.output
    bad = tmp_path / "fb.csv"
    bad.write_text("path,label\nnot/in/index.png,relevant\n")
    r = runner.invoke(search_cli, ["query", str(collection), "--like", "nope.png"])
    assert r.exit_code == 1 and "nope.png: not an image of this index" in r.output
    like = "dress/" + _any(collection, "dress")
    r = runner.invoke(search_cli, ["query", str(collection), "--like", like, "--feedback", str(bad)])
    assert r.exit_code == 1 and "not/in/index.png" in r.output and len(r.output.strip().splitlines()) == 1
    bad.write_text("path,label\n" + like + ",maybe\n")
    r = runner.invoke(search_cli, ["query", str(collection), "--like", like, "--feedback", str(bad)])
    assert r.exit_code == 1 and "'maybe'" in r.output
    r = runner.invoke(search_cli, ["query", str(tmp_path), "--like", like])
    assert r.exit_code == 1 and "not an itae-cluster output folder" in r.output
    r = runner.invoke(search_cli, ["serve", str(collection), "--like", like, "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output


def test_read_feedback_formats(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\na.png,1\nb.png,-\n")
    assert read_feedback(tmp_path / "a.csv") == {"a.png": True, "b.png": False}
    (tmp_path / "b.json").write_text('{"a.png": "relevant", "b.png": "no"}')
    assert read_feedback(tmp_path / "b.json") == {"a.png": True, "b.png": False}
    (tmp_path / "c.csv").write_text("file,verdict\na.png,1\n")
    with pytest.raises(InputError, match="path,label"):
        read_feedback(tmp_path / "c.csv")


# ---------------------------------------------------------------- server


def test_bind_is_local_unless_asked():
    for ok in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(ok)
    for bad in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(InputError, match="--allow-remote"):
            check_bind(bad)
    check_bind("0.0.0.0", allow_remote=True)


@pytest.fixture()
def served(collection, tmp_path):
    index = load_index(collection)
    session = new_session(index, collection, {"kind": "like", "value": index.paths[0]}, index.vectors[0],
                          index.model_id, k=8)
    app = SearchApp(index, session, tmp_path / "session.json")
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", index, tmp_path / "session.json"
    server.shutdown()
    server.server_close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _raw_get(base, path, host_header=None):
    """A request line sent as is (urllib would normalise '..')."""
    import http.client

    host, port = base.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.putrequest("GET", path, skip_host=host_header is not None, skip_accept_encoding=True)
    if host_header is not None:
        c.putheader("Host", host_header)
    c.endheaders()
    r = c.getresponse()
    return r.status, r.read()


def test_server_serves_only_files_of_the_index(served, collection):
    base, index, _ = served
    status, body = _get(base + "/img/3")
    assert status == 200 and body == (index.root / index.paths[3]).read_bytes()
    secret = collection / "summary.json"
    assert secret.is_file()
    for path in ("/img/../summary.json", "/img/..%2f..%2fsummary.json", "/img/-1", f"/img/{len(index)}",
                 "/img/" + index.paths[0], "/summary.json", "/../summary.json", "/img/%2e%2e/embeddings.npy",
                 "/img/3/../../summary.json", "//etc/passwd", "/img/" + str(secret), "/img/0x1"):
        status, body = _raw_get(base, path)
        assert status == 404, (path, status)
        assert body != secret.read_bytes()
    # DNS rebinding: a request for a foreign host name is refused, a loopback one is served
    port = base.rsplit(":", 1)[1]
    assert _raw_get(base, "/img/3", f"evil.example:{port}")[0] == 403
    assert _raw_get(base, "/api/results", "evil.example")[0] == 403
    assert _raw_get(base, "/img/3", f"localhost:{port}")[0] == 200


def test_server_refine_api(served):
    base, index, session_path = served
    state = json.loads(_get(base + "/api/results")[1])
    ids = [r["id"] for r in state["results"]]
    marks = {str(ids[0]): True, str(ids[1]): False}
    token = _get(base + "/")[1].decode().split('name="itae-token" content="', 1)[1].split('"', 1)[0]
    own = {"Content-Type": "application/json", "Origin": base, "X-Itae-Token": token}
    req = urllib.request.Request(base + "/api/refine", data=json.dumps({"marks": marks}).encode(),
                                 headers=own, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        new = json.loads(r.read())
    assert new["round"] == state["round"] + 1 and new["judged"] == {"relevant": 1, "irrelevant": 1}
    assert not {ids[0], ids[1]} & {r["id"] for r in new["results"]}
    saved = Session.load(session_path)
    assert saved.judgments == {index.paths[ids[0]]: True, index.paths[ids[1]]: False}
    bad = urllib.request.Request(base + "/api/refine", data=b'{"marks": {"99999": true}}', headers=own, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 400
