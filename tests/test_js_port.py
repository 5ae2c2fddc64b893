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

from itae_export.images import PreprocessSpec, decode_image, preprocess

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
