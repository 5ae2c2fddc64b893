"""itae-cluster end to end on real images (Fashion-MNIST, textile JPEGs) with an exported tiny model."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imagefolders as datasets
import numpy as np
import pytest
from click.testing import CliRunner
from itae_export.cli.cluster import main as cluster_cli
from PIL import Image

from itae_export.runtime import cuda_usable


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion") / "photos"
    labels = datasets.fashion_folder(root, per_class=30)
    messy = datasets.add_messy_files(root, labels)
    return root, {**labels, **messy["good"]}, messy


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _invoke(args):
    res = CliRunner().invoke(cluster_cli, [str(a) for a in args], catch_exceptions=False)
    return res


def _independent_embedding(sess, image_path, manifest):
    """Preprocessing written out here, not through itae_export.images."""
    pre = manifest["preprocessing"]
    h, w = pre["resolution"]
    img = Image.open(image_path)
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, np.float64) / 257.0).round().astype(np.uint8))
    img = img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    x = (np.asarray(img, np.float64) / 255.0 - pre["mean"]) / pre["std"]
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    return sess.run(["embedding"], {"pixel_values": x})[0][0]


def test_end_to_end_real_images(fashion, tiny_model, tmp_path):
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from threadpoolctl import threadpool_limits

    root, labels, messy = fashion
    out = tmp_path / "out"
    res = _invoke([root, "--k", 10, "--onnx", tiny_model, "--out", out, "--labels-from-dirs", "--batch-size", 16,
                   "--protocol", "paper", "--sets", 3, "--runs", 2, "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ACC" in res.output and "Skipped 3 files" in res.output

    rows = _read_csv(out / "assignments.csv")
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(labels) and len(set(paths)) == len(paths)  # every good image exactly once
    assert paths == sorted(paths)  # deterministic scan order
    assert all(r["label"] == labels[r["path"]] for r in rows)
    skipped = {r["path"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert set(skipped) == set(messy["bad"])
    assert all(skipped.values())
    assert "truncated" in next(v for k, v in skipped.items() if "truncated" in k)
    assert not set(messy["ignored"]) & (set(paths) | set(skipped))

    emb = np.load(out / "embeddings.npy")
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads(tiny_model.with_suffix(".json").read_text())
    assert emb.shape == (len(labels), manifest["embed_dim"])
    assert summary["counts"] == {"found": len(labels) + 3, "embedded": len(labels), "embedded_new": len(labels),
                                 "reused": 0, "skipped": 3}
    assert summary["itae"]["theta"] == manifest["itae"]["theta"] and summary["model"] == manifest["model"]
    assert summary["execution_provider"] == "CPUExecutionProvider" or cuda_usable()[0]
    assert sum(summary["cluster_sizes"]) == len(labels) and summary["images_per_s"] > 0

    # rows of embeddings.npy follow assignments.csv; CMYK and 16-bit files decoded, not skipped
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    for rel in [paths[0], next(p for p in paths if "cmyk" in p), next(p for p in paths if "16bit" in p), paths[-1]]:
        ref = _independent_embedding(sess, root / rel, manifest)
        np.testing.assert_allclose(emb[paths.index(rel)], ref, rtol=1e-4, atol=1e-4)

    # metrics recomputed from the written assignments and the folder labels
    clusters = np.array([int(r["cluster"]) for r in rows])
    classes = sorted(set(labels.values()))
    y = np.array([classes.index(labels[p]) for p in paths])
    table = np.zeros((10, len(classes)))
    for c, t in zip(clusters, y):
        table[c, t] += 1
    r_ind, c_ind = linear_sum_assignment(table, maximize=True)
    m = summary["metrics"]
    assert m["acc"] == pytest.approx(table[r_ind, c_ind].sum() / len(y), abs=1e-9)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, clusters), abs=1e-9)
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, clusters), abs=1e-9)
    assert m["acc"] > 1.5 / len(classes)  # even random weights cluster Fashion-MNIST far above chance
    assert summary["paper_protocol"]["protocol"]["sets"] == 3

    # the partition is K-Means (seed 0) on the L2-normalised embeddings.npy
    xn = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    with threadpool_limits(1):  # OpenMP barriers crawl on a busy 2-core machine
        again = KMeans(10, n_init=10, random_state=0).fit_predict(xn)
    assert adjusted_rand_score(clusters, again) == pytest.approx(1.0)
    dist = np.array([float(r["distance"]) for r in rows])
    centroids = np.stack([xn[clusters == c].mean(0) for c in range(10)])
    np.testing.assert_allclose(dist, np.linalg.norm(xn - centroids[clusters], axis=1), atol=2e-2)


def test_subprocess_textile_jpegs(tiny_model, tmp_path):
    if datasets.textile_root() is None:
        pytest.skip("conformal-clip-data is not installed")
    labels = datasets.textile_folder(tmp_path / "textiles", per_class=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "itae_export.cli.cluster", str(tmp_path / "textiles"), "--k", "3",
                           "--onnx", str(tiny_model), "--labels-from-dirs"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Execution provider: " in proc.stderr
    assert "img/s" not in proc.stderr  # stderr is not a TTY: no progress bar
    out = tmp_path / "textiles_itae"  # the default output folder
    rows = _read_csv(out / "assignments.csv")
    assert sorted(r["path"] for r in rows) == sorted(labels)
    assert json.loads((out / "summary.json").read_text())["labels"]["n_classes"] == len(set(labels.values()))


@pytest.mark.parametrize("case, args, message", [
    ("empty", ["{empty}", "--k", "2", "--onnx", "{model}"], "no images found"),
    ("k<2", ["{root}", "--k", "1", "--onnx", "{model}"], "--k: 1 must be an integer >= 2"),
    ("k>n", ["{root}", "--k", "10000", "--onnx", "{model}"], "more than the number of images"),
    ("missing onnx", ["{root}", "--k", "3", "--onnx", "{tmp}/nope.onnx"], "nope.onnx: no such"),
    ("bad device", ["{root}", "--k", "3", "--onnx", "{model}", "--device", "gpu"], "'gpu' is not one of"),
    ("both models", ["{root}", "--k", "3", "--onnx", "{model}", "--model", "vits14"], "not both"),
    ("flags with onnx", ["{root}", "--k", "3", "--onnx", "{model}", "--theta", "2"], "--theta: only with --model"),
    ("protocol without labels", ["{root}", "--k", "3", "--onnx", "{model}", "--protocol", "paper"], "--labels-from-dirs"),
    ("missing input", ["{tmp}/nowhere", "--k", "3", "--onnx", "{model}"], "nowhere: no such file or folder"),
])
def test_errors_are_one_clear_line(case, args, message, fashion, tiny_model, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    subs = {"empty": tmp_path / "empty", "root": fashion[0], "model": tiny_model, "tmp": tmp_path}
    args = [a.format(**subs) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    res = CliRunner().invoke(cluster_cli, args)
    assert res.exit_code in (1, 2), res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.skipif(cuda_usable()[0], reason="CUDA is usable here")
def test_device_cuda_unusable_is_an_error(fashion, tiny_model, tmp_path):
    res = CliRunner().invoke(cluster_cli, [str(fashion[0]), "--k", "3", "--onnx", str(tiny_model), "--device", "cuda",
                                           "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--device cuda: CUDA is not usable here" in res.output


def test_labels_need_class_folders(tiny_model, tmp_path):
    datasets.fashion_folder(tmp_path / "f", per_class=3, classes=2)
    shutil.copy(next((tmp_path / "f").rglob("*.png")), tmp_path / "f" / "loose.png")
    res = CliRunner().invoke(cluster_cli, [str(tmp_path / "f"), "--k", "2", "--onnx", str(tiny_model),
                                           "--labels-from-dirs", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "loose.png" in res.output


def _stamp_identity(path: Path, identity: dict) -> None:
    """Give a copied tiny graph the export identity a real export would record (in the graph and beside it)."""
    import onnx

    from itae_export.onnx.contract import METADATA_KEY
    from itae_export.onnx.manifest import seal

    proto = onnx.load(str(path))
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    manifest = json.loads(prop.value)
    manifest["identity"] = identity
    seal(proto, manifest)
    onnx.save(proto, str(path))
    path.with_suffix(".json").write_text(json.dumps(manifest))


def _fake_export(tiny_model: Path, calls: list, record=lambda spec, options, output, kw: None):
    """Stands in for the real-size export: copies the tiny graph with the identity a real export records."""
    import itae_export.onnx.export as export_mod
    from itae_export.weights.checkpoints import weights_identity

    def fake(spec_, options, output, **kw):
        calls.append(record(spec_, options, output, kw))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_model, output)
        req = export_mod.ExportRequest.make(spec_, options, output, resolution=kw["resolution"],
                                            precision=kw["precision"])
        _stamp_identity(Path(output), export_mod.export_identity(req, weights_identity(spec_, kw["weights"]),
                                                                 kw["pos_rule"]))
        return export_mod.ExportResult(Path(output), {})

    return fake


def test_model_flag_uses_and_exports_default_path(fashion, tiny_model, tmp_path, monkeypatch):
    import itae_export.onnx.export as export_mod
    from itae_export.registry import ITAEOptions, get_model_spec

    monkeypatch.setenv("ITAE_EXPORT_DIR", str(tmp_path / "exported"))
    spec = get_model_spec("dinov2_vits14")
    calls = []
    fake_export = _fake_export(tiny_model, calls, lambda spec_, options, output, kw: (spec_.name, options,
                                                                                      Path(output), kw))
    monkeypatch.setattr(export_mod, "export_onnx", fake_export)
    base = [str(fashion[0]), "--k", "3", "--model", "vits14", "--resolution", "56", "--quiet"]
    res = CliRunner().invoke(cluster_cli, base + ["--no-itae", "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    expected = export_mod.default_output_path(spec, ITAEOptions(theta=spec.theta, enabled=False), 56)
    assert len(calls) == 1 and calls[0][0] == "dinov2_vits14" and calls[0][1].enabled is False
    assert calls[0][2] == expected and calls[0][3]["resolution"] == 56
    assert json.loads((tmp_path / "o1" / "summary.json").read_text())["onnx"] == str(expected.resolve())
    # second time: the file exists with the same identity, nothing is exported
    res = CliRunner().invoke(cluster_cli, base + ["--no-itae", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0 and len(calls) == 1
    # different ITAE flags name a different file
    res = CliRunner().invoke(cluster_cli, base + ["--theta", "2.5", "--out", str(tmp_path / "o3")])
    assert res.exit_code == 0 and len(calls) == 2 and calls[1][1].theta == 2.5 and calls[1][2] != expected


def test_the_everyday_command_uses_the_default_model(fashion, tiny_model, tmp_path, monkeypatch):
    """`itae-cluster folder/ --k 10`, as the README's first line has it: the default model, exported once."""
    import itae_export.onnx.export as export_mod
    from itae_export.registry import DEFAULT_CLUSTER_MODEL

    monkeypatch.setenv("ITAE_EXPORT_DIR", str(tmp_path / "exported"))
    seen = []

    def fake_export(spec_, options, output, **kw):
        seen.append(spec_.name)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_model, output)
        return export_mod.ExportResult(Path(output), {})

    monkeypatch.setattr(export_mod, "export_onnx", fake_export)
    res = CliRunner().invoke(cluster_cli, [str(fashion[0]), "--k", "3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen == [DEFAULT_CLUSTER_MODEL] == ["dinov2_vitb14"]
    assert f"using {DEFAULT_CLUSTER_MODEL}" in res.stderr


def test_other_weights_are_exported_again_not_reused(fashion, tiny_model, tmp_path, monkeypatch):
    """--weights A.pth then --weights B.pth: the same file name, but B's run must not use A's export."""
    import itae_export.onnx.export as export_mod

    monkeypatch.setenv("ITAE_EXPORT_DIR", str(tmp_path / "exported"))
    a, b = tmp_path / "A.pth", tmp_path / "B.pth"
    a.write_bytes(b"weights A")
    b.write_bytes(b"weights B")
    calls = []
    fake_export = _fake_export(tiny_model, calls, lambda spec_, options, output, kw: kw["weights"])
    monkeypatch.setattr(export_mod, "export_onnx", fake_export)
    base = [str(fashion[0]), "--k", "3", "--model", "vits14", "--resolution", "56"]
    for i, w in enumerate([a, b, b, a]):
        res = CliRunner().invoke(cluster_cli, base + ["--weights", str(w), "--out", str(tmp_path / f"o{i}")])
        assert res.exit_code == 0, res.output
    assert calls == [str(a), str(b), str(a)]  # the third run (B again) reused B's export
    assert "exported with another weights" in res.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_matches_cpu(fashion, precision, tmp_path_factory):
    from itae_export.data.embed import embed_folder

    model = datasets.tiny_onnx(tmp_path_factory.getbasetemp() / "models", resolution=56, precision=precision)
    root = fashion[0]
    paths = sorted(root.rglob("*.png"))[:40]
    cpu = embed_folder(root, model, paths=paths, device="cpu", batch_size=8, progress=False)
    gpu = embed_folder(root, model, paths=paths, device="cuda", batch_size=8, progress=False)
    assert gpu.provider == "CUDAExecutionProvider" and cpu.paths == gpu.paths
    tol = 1e-3 if precision == "fp32" else 3e-2
    np.testing.assert_allclose(gpu.embeddings, cpu.embeddings, rtol=tol, atol=tol)
