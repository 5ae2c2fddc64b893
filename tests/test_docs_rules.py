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
