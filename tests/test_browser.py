"""examples/browser in headless Chromium (onnxruntime-web, WASM) against Python ONNX Runtime.

The page is served from a local 127.0.0.1 server. It decodes real photos (PNG crops of
scikit-learn's sample images) and the hostile kinds of issue 25 (tests/hostile.py: 16-bit grey,
tRNS colour keys, 16-bit RGBA and grey+alpha, 1/2/4-bit grey, palette with tRNS, WebP with EXIF
orientation, JPEG with orientation only in XMP, PNG with orientation in a raw-profile chunk ...)
with examples/browser/decode.mjs (no canvas), and feeds the RGB bytes to the in-graph variant,
which the page picks by default even when given the plain graph's URL. The decoded bytes must
equal Pillow's, the embeddings Python ORT's on Pillow's bytes to <= 1e-4 of the output scale,
masks equal. CMYK JPEG and GIF are refused with a visible message. The page's JSON download
holds the same embeddings. It also feeds the plain graph the Python path's preprocessed tensors,
and the same graph the page's JavaScript port of the contract (preprocess.mjs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hostile import write_kinds
from test_report import CHROMIUM_FLAGS, find_or_install_chromium
from tiny import random_model, theta_for_varied_artifacts, tiny_spec

from itae_export.images import decode_image, load_image
from itae_export.onnx.contract import FP32_REL_TOL
from itae_export.onnx.export import export_onnx
from itae_export.onnx.preprocess_graph import export_in_graph
from itae_export.registry import ITAEOptions
from itae_export.runtime import ort_session as onnx_session
from itae_export.runtime import run_onnx

pytestmark = pytest.mark.browser
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "browser"


@pytest.fixture(scope="module")
def chromium():
    path, why = find_or_install_chromium()
    if path is None:
        pytest.skip(why)
    if not all((EXAMPLE / "node_modules" / m).is_dir() for m in ("onnxruntime-web", "@jsquash/jpeg", "fast-png")):
        if not shutil.which("npm"):
            pytest.skip("npm is not installed (needed for onnxruntime-web)")
        try:
            subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True,
                           capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"npm could not install onnxruntime-web (offline?): {type(e).__name__}")
    return path


class _Handler(SimpleHTTPRequestHandler):
    """/ -> examples/browser, /data/ -> the test's folder, POST /report -> the page's results."""

    def __init__(self, *a, data: Path, sink: dict, **kw):
        self.data, self.sink = data, sink
        super().__init__(*a, directory=str(EXAMPLE), **kw)

    def translate_path(self, path):
        if path.startswith("/data/"):
            return str(self.data / path[len("/data/"):].split("?")[0])
        return super().translate_path(path)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.sink["result"] = json.loads(body)
        self.send_response(204)
        self.end_headers()
        self.sink["event"].set()

    def log_message(self, *args):
        pass


def _photos(folder: Path) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    crops = {"china_131x97.png": china[40:137, 60:191], "flower_160x120.png": flower[100:220, 200:360],
             "china_300x250.png": china[150:400, 300:600], "flower_61x203.png": flower[0:203, 500:561]}
    paths = []
    for name, a in crops.items():
        Image.fromarray(a).save(folder / name)
        paths.append(folder / name)
    return paths


def test_browser_page_equals_python_ort(chromium, tmp_path):
    spec = tiny_spec("dinov2_vits14_reg")
    model = random_model(spec, seed=7)
    theta = theta_for_varied_artifacts(model, spec)
    plain = export_onnx(spec, ITAEOptions(theta=theta), tmp_path / "m.onnx", model=model, resolution=56, validate=False)
    img = export_in_graph(plain.path, validate=False)
    photos = _photos(tmp_path)
    kinds = write_kinds(tmp_path / "kinds")
    for p in kinds.values():
        p.rename(tmp_path / p.name)
    hostile = [tmp_path / n for n in kinds]
    from PIL import Image

    Image.fromarray(photos_rgb := np.asarray(decode_image(photos[0])[0])).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(photos_rgb).save(tmp_path / "anim.gif")
    refused = [tmp_path / "cmyk.jpg", tmp_path / "anim.gif"]
    decoded = photos + hostile
    x = np.stack([load_image(p, plain.manifest["preprocessing"]) for p in photos])  # the golden tensors
    (tmp_path / "x.f32").write_bytes(x.astype("<f4").tobytes())
    # the plain graph's URL: the page must pick m_image.onnx beside it (the in-graph variant is its default)
    plan = {"in_graph": {"model": "/data/m.onnx",
                         "images": [f"/data/{p.name}" for p in decoded + refused]},
            "plain": {"model": "/data/m.onnx", "manifest": "/data/m.json", "tensors": "/data/x.f32",
                      "shape": list(x.shape), "images": [f"/data/{p.name}" for p in photos]},
            "report": "/report"}
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    sink = {"event": threading.Event()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, data=tmp_path, sink=sink))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html?test=/data/plan.json&ep=wasm"
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        done = sink["event"].wait(240)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()
    assert done, "the page did not report within 240 s"
    got = sink["result"]
    assert "error" not in got, got.get("error")
    assert got["ep"] == "wasm" and "ViT-g/14" in got["limits"] and "does not fit" in got["limits"]
    assert got["input"] == "image", "the page did not default to the in-graph variant"

    # refused kinds: one visible line each, naming the file
    assert len(got["errors"]) == len(refused), got["errors"]
    for p, line in zip(refused, got["errors"]):
        assert line.startswith(f"{p.name}: ") and ("CMYK" in line or "GIF" in line), line

    # the in-graph variant, fed decode.mjs's bytes, against Python ORT fed Pillow's bytes
    assert [r["name"] for r in got["in_graph"]] == [p.name for p in decoded]
    sess = onnx_session(img.path)
    ref_e, ref_m = [], []
    for p, r in zip(decoded, got["in_graph"]):
        rgb = np.asarray(decode_image(p)[0])
        assert (r["height"], r["width"]) == rgb.shape[:2], p.name
        np.testing.assert_array_equal(np.asarray(r["rgb"], np.uint8).reshape(rgb.shape), rgb, err_msg=p.name)
        e, m = sess.run(None, {"image": rgb[None]})
        ref_e.append(e[0])
        ref_m.append(m[0])
    ref_e, ref_m = np.stack(ref_e), np.stack(ref_m)
    emb = np.asarray([r["embedding"] for r in got["in_graph"]], np.float32)
    for name, a, b in zip([p.name for p in decoded], emb, ref_e):
        assert np.abs(a - b).max() <= FP32_REL_TOL * np.abs(ref_e).max(), name
    np.testing.assert_array_equal(np.asarray([r["mask"] for r in got["in_graph"]]), ref_m)
    assert ref_m.any()

    # the download link saves the same embeddings as JSON
    saved = json.loads(got["download"]["text"])
    assert got["download"]["name"] == "embeddings.json" and got["download"]["visible"]
    assert [i["name"] for i in saved["items"]] == [p.name for p in decoded] and saved["input"] == "image"
    np.testing.assert_array_equal(np.asarray([i["embedding"] for i in saved["items"]], np.float32), emb)
    np.testing.assert_array_equal(np.asarray([i["artifact_mask"] for i in saved["items"]]), ref_m)
    assert len(saved["refused"]) == len(refused)
    assert (got["in_graph"][0]["maskType"], got["in_graph"][0]["maskData"]) == ("bool", "Uint8Array")
    assert {r["cluster"] for r in got["in_graph"]} <= {0, 1}
    # one card per image on the page, with its artifact count and its neighbours
    assert len(got["cards"]) == len(decoded)
    for card, p, m in zip(got["cards"], decoded, ref_m):
        assert p.name in card and f"artifact tokens: {int(m.sum())}" in card and "neighbours:" in card

    # the run's artifact line, and the sanity warning exactly when Python's rule fires (issue 23)
    from itae_export.cluster.artifacts import artifact_stats, counts_from_masks

    stats = artifact_stats(counts_from_masks(ref_m), ref_m.shape[1], theta=theta)
    art = got["artifacts"]
    assert f"{100 * stats['share_tokens_flagged']:.2f}% of the candidate tokens" in art["line"], art
    assert f"{stats['images_with_any']} of {len(decoded)} images with any" in art["line"], art
    assert bool(art["warning"]) == bool(stats["warning"]) == art["warningVisible"], (art, stats)

    ref = run_onnx(plain.path, x)
    emb = np.asarray([r["embedding"] for r in got["plain"]], np.float32)
    assert np.abs(emb - ref["embedding"]).max() <= FP32_REL_TOL * np.abs(ref["embedding"]).max()
    np.testing.assert_array_equal(np.asarray([r["mask"] for r in got["plain"]]), ref["artifact_mask"])
    # and fed the JavaScript port of the contract (examples/browser/preprocess.mjs) from the canvas
    emb = np.asarray([r["embedding"] for r in got["plain_js"]], np.float32)
    assert np.abs(emb - ref["embedding"]).max() <= FP32_REL_TOL * np.abs(ref["embedding"]).max()
    np.testing.assert_array_equal(np.asarray([r["mask"] for r in got["plain_js"]]), ref["artifact_mask"])
