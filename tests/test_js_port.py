"""examples/browser/preprocess.mjs, a JavaScript port of the contract's resize and normalisation,
against the golden files (bit for bit) and the Python path on odd shapes. Node.js only."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itae_export.images import ImageDecodeError, PreprocessSpec, decode_image, preprocess

pytestmark = pytest.mark.node
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
RUN = """
import { readFileSync, writeFileSync } from "node:fs";
import { preprocess } from "%s";
const jobs = JSON.parse(readFileSync(process.argv[1], "utf8"));
for (const j of jobs.items) {
  const b = readFileSync(j.rgb);
  const x = preprocess(new Uint8Array(b.buffer, b.byteOffset, b.byteLength), j.h, j.w, jobs.pre);
  writeFileSync(j.out, Buffer.from(x.buffer));
}
"""


def test_js_port_reaches_the_golden_tensors(tmp_path):
    if not shutil.which("node"):
        pytest.skip("Node.js is not installed")
    golden = json.loads((GOLDEN / "golden.json").read_text())
    pre = golden["preprocessing"]
    rng = np.random.default_rng(0)
    items, expect = [], {}
    sources = [(n, np.asarray(decode_image(GOLDEN / "inputs" / n)[0])) for n in golden["files"]]
    sources += [(f"random_{h}x{w}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for h, w in ((552, 97), (13, 700), (1, 1), (224, 224))]
    for name, rgb in sources:
        (tmp_path / f"{name}.rgb").write_bytes(rgb.tobytes())
        items.append({"rgb": str(tmp_path / f"{name}.rgb"), "h": rgb.shape[0], "w": rgb.shape[1],
                      "out": str(tmp_path / f"{name}.f32")})
        expect[name] = preprocess(Image.fromarray(rgb), PreprocessSpec.from_manifest(pre))
    (tmp_path / "jobs.json").write_text(json.dumps({"pre": pre, "items": items}))
    script = RUN % (ROOT / "examples" / "browser" / "preprocess.mjs").as_uri()
    proc = subprocess.run(["node", "--input-type=module", "-e", script, str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import hashlib

    for (name, _), item in zip(sources, items):
        got = np.fromfile(item["out"], "<f4").reshape(3, 224, 224)
        np.testing.assert_array_equal(got, expect[name], err_msg=name)
        if name in golden["files"]:
            assert hashlib.sha256(got.tobytes()).hexdigest() == golden["files"][name]["sha256_pixel_values"]


DECODE = """
import { readFileSync, writeFileSync } from "node:fs";
import { init as initJpeg } from "@jsquash/jpeg/decode.js";
import { init as initWebp } from "@jsquash/webp/decode.js";
import { decodeToRGB } from "./decode.mjs";
await initJpeg(await WebAssembly.compile(readFileSync("node_modules/@jsquash/jpeg/codec/dec/mozjpeg_dec.wasm")));
await initWebp(await WebAssembly.compile(readFileSync("node_modules/@jsquash/webp/codec/dec/webp_dec.wasm")));
const jobs = JSON.parse(readFileSync(process.argv[1], "utf8")), report = {};
for (const j of jobs) {
  try {
    const r = await decodeToRGB(readFileSync(j.path), j.name);
    writeFileSync(j.out, r.rgb);
    report[j.name] = { height: r.height, width: r.width, notes: r.notes };
  } catch (e) { report[j.name] = { refused: e.message, kind: e.name }; }
}
console.log(JSON.stringify(report));
"""


def _jpeg_variants(folder: Path) -> list[Path]:
    from hostile import photo

    a = photo(187, 251, seed=1)
    out = []
    for q, ss in ((50, 0), (75, 1), (90, 2), (95, 2)):
        out.append(folder / f"q{q}_ss{ss}.jpg")
        Image.fromarray(a).save(out[-1], quality=q, subsampling=ss)
    out.append(folder / "progressive.jpg")
    Image.fromarray(a).save(out[-1], quality=80, progressive=True)
    out.append(folder / "grey.jpg")
    Image.fromarray(a).convert("L").save(out[-1], quality=85)
    return out


BROKEN = ("truncated.jpg", "truncated.png", "truncated.webp", "notimage.png", "empty.jpg", "huge.png")


def _broken(folder: Path) -> list[Path]:
    """Files both paths must refuse: truncated JPEG/PNG/WebP, not an image, empty, over the size limit."""
    import struct
    import zlib

    from hostile import photo, png

    a = photo(120, 160, seed=2)
    Image.fromarray(a).save(folder / "whole.jpg", quality=90)
    Image.fromarray(a).save(folder / "whole.webp", quality=90)
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:4000])
    (folder / "truncated.webp").write_bytes((folder / "whole.webp").read_bytes()[:1500])
    (folder / "truncated.png").write_bytes(png(a, 2, 8)[:5000])
    (folder / "notimage.png").write_bytes(b"hello, not a PNG")
    (folder / "empty.jpg").write_bytes(b"")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                                       + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    return [folder / n for n in BROKEN]


def test_js_decoder_gives_pillows_rgb(tmp_path):
    """examples/browser/decode.mjs (the page's decoder: @jsquash/jpeg, @jsquash/webp, fast-png and the
    contract's rules) against the Python path's decode_image, value for value, on every hostile kind,
    the golden inputs and JPEG variants; CMYK is refused with a message naming the file."""
    from hostile import write_kinds

    browser = ROOT / "examples" / "browser"
    if not shutil.which("node"):
        pytest.skip("Node.js is not installed")
    if not (browser / "node_modules" / "@jsquash" / "jpeg").is_dir():
        pytest.skip("examples/browser/node_modules is not installed (npm ci --ignore-scripts)")
    files = list(write_kinds(tmp_path / "kinds").values()) + sorted((GOLDEN / "inputs").iterdir()) \
        + _jpeg_variants(tmp_path) + _broken(tmp_path)
    jobs = [{"name": f"{i}_{p.name}", "path": str(p), "out": str(tmp_path / f"{i}.rgb")} for i, p in enumerate(files)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(["node", "--input-type=module", "-e", DECODE, str(tmp_path / "jobs.json")], cwd=browser,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    refused = {}
    for job, p in zip(jobs, files):
        r = report[job["name"]]
        if "refused" in r:
            refused[p.name] = r["refused"]
            continue
        want = np.asarray(decode_image(p)[0])
        got = np.fromfile(job["out"], np.uint8).reshape(r["height"], r["width"], 3)
        np.testing.assert_array_equal(got, want, err_msg=p.name)
    python_refused = set()
    for p in files:
        try:
            decode_image(p)
        except ImageDecodeError:
            python_refused.add(p.name)
    assert set(refused) == python_refused | {"cmyk.jpg"}, (refused, python_refused)  # CMYK: refused by the page only
    assert python_refused == {n for n in BROKEN}
    assert "cmyk.jpg" in refused["cmyk.jpg"] and "CMYK" in refused["cmyk.jpg"]
    assert "above the limit of 120000000 pixels" in refused["huge.png"]
    assert len(files) - len(refused) >= 30


ARTIFACTS = """
import { readFileSync } from "node:fs";
import { artifactSummary, WARN_SHARE } from "./artifacts.mjs";
const cases = JSON.parse(readFileSync(process.argv[1], "utf8"));
console.log(JSON.stringify({ warn_share: WARN_SHARE,
  got: cases.map((c) => artifactSummary(c.masks.map((m) => m.map(Boolean)), c.theta)) }));
"""


def test_browser_artifact_summary_equals_python_stats(tmp_path):
    """examples/browser/artifacts.mjs (the page's artifact line and its warning) against
    itae_export.cluster.artifacts on the same masks: the same counts, the same threshold, and the
    warning exactly when Python's sanity rule fires (issue 23: the overlay on ordinary photos)."""
    from itae_export.cluster.artifacts import WARN_SHARE, artifact_stats, counts_from_masks

    browser = ROOT / "examples" / "browser"
    if not shutil.which("node"):
        pytest.skip("Node.js is not installed")
    rng = np.random.default_rng(0)
    shares = (0.0, 0.01, 0.049, 0.051, 0.22, 0.5)  # either side of WARN_SHARE, and the 22 %
    cases = [{"theta": 3.0, "masks": (rng.random((7, 260)) < p).astype(int).tolist()} for p in shares]
    exact = np.zeros((4, 100), int)
    exact[:, :5] = 1  # exactly 5 %: not above the line, no warning on either side
    cases.append({"theta": 2.5, "masks": exact.tolist()})
    cases.append({"theta": 2.0376524925231934, "masks": (rng.random((3, 20)) < 0.2).astype(int).tolist()})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(["node", "--input-type=module", "-e", ARTIFACTS, str(tmp_path / "cases.json")], cwd=browser,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["warn_share"] == WARN_SHARE
    warned = 0
    for c, got in zip(cases, out["got"]):
        masks = np.asarray(c["masks"], bool)
        want = artifact_stats(counts_from_masks(masks), masks.shape[1], theta=c["theta"])
        assert got["images"] == want["images"] and got["candidates"] == want["candidate_tokens_per_image"]
        assert got["tokens"] == want["tokens_flagged"] and got["max"] == want["max"]
        assert got["withAny"] == want["images_with_any"]
        for k_js, k_py in (("mean", "mean"), ("median", "median"), ("share", "share_tokens_flagged")):
            assert got[k_js] == pytest.approx(want[k_py], abs=1e-12), k_js
        assert (got["warning"] is not None) == (want["warning"] is not None), (c["theta"], want["share_tokens_flagged"])
        if got["warning"]:
            warned += 1
            assert f"{100 * want['share_tokens_flagged']:.1f}% of the candidate tokens at theta {c['theta']:g}" \
                in got["warning"] and "itae-inspect" in got["warning"] and "--no-itae" in got["warning"]
        assert f"{100 * want['share_tokens_flagged']:.2f}% of the candidate tokens" in got["line"]
    assert warned == 4
