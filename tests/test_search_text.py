"""CLIP's text tower and tokenizer: parity with open_clip and transformers on random weights of the
real ViT-B/16 text architecture, in their own checkpoint formats (open_clip state dict, Hugging
Face CLIPModel directory, OpenAI TorchScript archive), and the exported ONNX graph used for a text
query against a collection of the same checkpoint.

Error: ``rel = max|ours - ref| / max|ref|`` over the text embeddings, required <= 1e-5.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings

import numpy as np
import pytest
import refimpl as R
import torch
from click.testing import CliRunner
from transformers import CLIPConfig, CLIPModel  # before open_clip puts the torchvision shim on sys.path

from itae_export.cli.search import main as search_cli
from itae_export.errors import CheckpointError, InputError
from itae_export.model.text import build_text_model, convert_text_state_dict
from itae_export.onnx.text_export import export_text_tower, load_text_tower, validate_text_graph
from itae_export.registry import get_text_arch
from itae_export.search.index import build_index
from itae_export.search.text import TextEncoder
from itae_export.search.tokenizer import ClipTokenizer, write_tokenizer_files
from itae_export.weights.checkpoints import read_checkpoint, sha256_file

TOL = 1e-5
DEPTH4 = dataclasses.replace(get_text_arch("clip_vitb16"), layers=4)
DEPTH1 = dataclasses.replace(get_text_arch("clip_vitb16"), layers=1)
AWKWARD = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "Ünïcödé façade naïve café", "東京タワーの写真", "Привет, мир!",
    "emoji 🚀👍🏽🇯🇵 family 👨‍👩‍👧", "it's they're we've I'm you'll he'd", "tabs\tand\nnewlines\r\n  spaces",
    "&amp;lt;b&amp;gt; html &quot;entities&quot; &#39;x&#39;", "mojibake: cafÃ©", "numbers 3.14159 1,000,000 2nd",
    "<start_of_text> special <end_of_text> tokens", "long " * 120, "x" * 300, "ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "zero\u200bwidth\u00a0nbsp", "٣ arabic-indic digits ١٢", "punctuation!!! ??? ... --- ***", "🙂" * 90,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return d


def test_tokenizer_matches_open_clip_on_awkward_strings(tok_dir):
    open_clip = R.import_open_clip()
    ref = open_clip.tokenizer.SimpleTokenizer()
    ours = ClipTokenizer(tok_dir)
    got = ours(AWKWARD)
    want = ref(AWKWARD).numpy()
    for text, g, w in zip(AWKWARD, got, want):
        assert (g == w).all(), (text, g[:12], w[:12])
    assert got.dtype == np.int64 and got.shape == (len(AWKWARD), 77)
    assert got[AWKWARD.index("long " * 120), -1] == ours.eot  # truncated, EOT forced last
    assert list(got[0, :3]) == [ours.sot, ours.eot, 0]  # empty text: SOT EOT, zeros
    # the files are the runtime's only source: a changed merge changes the tokens
    merges = (tok_dir / "merges.txt").read_text().splitlines()
    assert len(merges) == 48894 and len(json.loads((tok_dir / "vocab.json").read_text())) == 49408


def _open_clip_model(seed: int = 0, layers: int | None = None):
    """open_clip's CLIP with the real ViT-B/16 text tower (``layers`` fewer when given) and a tiny
    vision tower, random weights."""
    open_clip = R.import_open_clip()
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    text_cfg = {**cfg["text_cfg"], **({"layers": layers} if layers else {})}
    torch.manual_seed(seed)
    m = CLIP(cfg["embed_dim"], CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=224),
             CLIPTextCfg(**text_cfg), quick_gelu=True)
    return R.randomize_(m, seed).eval()


def _ids(tok_dir, texts=AWKWARD[:8]):
    return torch.from_numpy(ClipTokenizer(tok_dir)(texts))


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory):
    ref = _open_clip_model()
    path = tmp_path_factory.mktemp("oc") / "open_clip_vitb16.pt"
    R.save_torch(ref.state_dict(), path)
    return ref, path


def test_text_tower_matches_open_clip(open_clip_ckpt, tok_dir):
    ref, path = open_clip_ckpt
    model, info = load_text_tower("clip_vitb16", path)
    assert info["format"] == "openai-clip/open-clip" and len(info["sha256"]) == 64
    ids = _ids(tok_dir)
    with torch.no_grad():
        err = R.rel_err(model(ids), ref.encode_text(ids, normalize=False))
    print(f"open_clip ViT-B/16 text: rel {err:.3g}")
    assert err <= TOL


def test_text_tower_matches_transformers(tmp_path, tok_dir):
    # the real ViT-B/16 text width at depth 4 (the same code path per layer), as test_parity does for
    # transformers' vision CLIP
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=512)
    torch.manual_seed(0)
    ref = R.randomize_(CLIPModel(cfg), 0).eval()
    path = R.save_hf(ref, tmp_path / "hf")
    raw, _ = read_checkpoint(path)
    sd, fmt = convert_text_state_dict(raw, str(path))
    assert fmt == "hf-clip"
    model = build_text_model(DEPTH4, sd, str(path))
    ids = _ids(tok_dir)
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        err = R.rel_err(model(ids), want)
    print(f"transformers ViT-B/16 text: rel {err:.3g}")
    assert err <= TOL


def test_text_checkpoint_errors(tmp_path, open_clip_ckpt):
    _, path = open_clip_ckpt
    with pytest.raises(CheckpointError, match="does not fit"):
        load_text_tower("clip_vitl14", path)  # a B/16 text tower is not an L/14 one
    with pytest.raises(InputError, match="has no text tower"):
        get_text_arch("vits14")


def _collection(tmp_path, model_name: str, sha: str, vectors: np.ndarray):
    """An itae-cluster output folder whose image graph was exported from the checkpoint ``sha``."""
    out = tmp_path / "coll"
    out.mkdir()
    np.save(out / "embeddings.npy", vectors.astype(np.float32))
    with open(out / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "cluster", "distance"])
        w.writerows((f"img{i:03d}.png", 0, "0") for i in range(len(vectors)))
    onnx = tmp_path / "image.onnx"
    onnx.write_bytes(b"")
    onnx.with_suffix(".json").write_text(json.dumps({"model": model_name, "weights": {"sha256": sha}}))
    (out / "summary.json").write_text(json.dumps({"model_id": "sha256:" + "c" * 64, "model": model_name,
                                                  "onnx": str(onnx), "folder": str(tmp_path / "images")}))
    return out


def test_exported_text_graph_answers_text_queries(tmp_path, tok_dir):
    # the ONNX graph against open_clip itself, at the real width and depth 1 (the export is the slow part)
    ref = _open_clip_model(seed=1, layers=1)
    path = R.save_torch(ref.state_dict(), tmp_path / "open_clip_depth1.pt")
    raw, _ = read_checkpoint(path)
    model = build_text_model(DEPTH1, convert_text_state_dict(raw, path)[0], path)
    export = tmp_path / "text"
    info = {"source": str(path), "format": "open-clip", "sha256": sha256_file(path)}
    result = export_text_tower("clip_vitb16", None, export, model=model, weights_info=info)
    manifest = json.loads((export / "text.json").read_text())
    assert manifest["validation"]["passed"] and result["validation"]["max_rel_err"] <= 1e-4
    assert {p.name for p in export.iterdir()} >= {"text.onnx", "vocab.json", "merges.txt"}
    # the validation can fail: the same graph against a tower with one weight changed
    moved = build_text_model(DEPTH1, {k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        moved.ln_final.bias += 0.05
    bad = validate_text_graph((export / "text.onnx").read_bytes(), moved, ClipTokenizer(export))
    assert not bad["passed"] and bad["max_rel_err"] > 1e-3
    enc = TextEncoder(export)
    ids = _ids(tok_dir)
    with torch.no_grad():
        want = ref.encode_text(ids, normalize=False).numpy()
    got = enc(AWKWARD[:8])
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"ONNX text graph vs open_clip: rel {err:.3g}")
    assert err <= TOL

    # a text query meets a collection of the same checkpoint: its own embedding comes first
    texts = ["a red dress", "a blue boot", "a striped shirt"]
    rng = np.random.default_rng(0)
    vecs = np.concatenate([enc(texts), rng.standard_normal((30, 512))])
    coll = _collection(tmp_path, "clip_vitb16", info["sha256"], vecs)
    r = CliRunner().invoke(search_cli, ["query", str(coll), "--text", "a blue boot", "--text-model", str(export), "-k", "3"])
    assert r.exit_code == 0, r.output
    top = list(csv.DictReader(r.stdout.splitlines()))[0]
    assert top["path"] == "img001.png" and float(top["score"]) > 0.9999
    # another checkpoint's images are refused
    other = tmp_path / "other"
    other.mkdir()
    coll2 = _collection(other, "clip_vitb16", "0" * 64, vecs)
    r = CliRunner().invoke(search_cli, ["query", str(coll2), "--text", "a blue boot", "--text-model", str(export)])
    assert r.exit_code == 1 and "same checkpoint" in r.output
    build_index(coll2)  # the collection itself is fine
    r = CliRunner().invoke(search_cli, ["export-text", "--model", "vits14", "--weights", str(path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "has no text tower" in r.output  # a bad --model value: a usage error


class _OpenAITree(torch.nn.Module):
    """OpenAI CLIP's attribute tree (text tower at the top level, ``visual``, ``logit_scale``), traced."""

    def __init__(self, clip):
        super().__init__()
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                     "visual", "logit_scale"):
            setattr(self, name, getattr(clip, name))

    def forward(self, x):
        return self.visual(x) * self.logit_scale.exp()


def test_text_tower_from_an_openai_torchscript_archive(tmp_path, tok_dir):
    ref = _open_clip_model(seed=2, layers=1)
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about open_clip's shape checks
        torch.jit.save(torch.jit.trace(_OpenAITree(ref).eval(), R.images(1), check_trace=False), str(path))
    raw, fmt = read_checkpoint(path)  # the restricted unpickler, no pickle code runs
    assert fmt == "openai-clip"
    model = build_text_model(DEPTH1, convert_text_state_dict(raw, str(path))[0], str(path))
    ids = _ids(tok_dir)
    with torch.no_grad():
        err = R.rel_err(model(ids), ref.encode_text(ids, normalize=False))
    assert err <= TOL
