"""Run the exported graph in ONNX Runtime and judge it against a float64 PyTorch run.

The gate (docs/onnx-contract.md, "Validation"): the float64 run of the same model is the
reference; float32 PyTorch's own distance from it, on the same inputs, says how close float32
can be, so a deep model is not asked for more than float32 gives. Mask tokens may differ only
where the float64 norm is within a float32 margin of theta, and each such flip is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export.cluster.artifacts import artifact_stats, counts_from_masks
from itae_export.cluster.metrics import kmeans_ari, l2_normalize
from itae_export.data.embed import load_items, source_items
from itae_export.images import PreprocessSpec, to_rgb
from itae_export.images import preprocess as _preprocess
from itae_export.onnx.contract import (
    FLOAT32_REACH,
    FP16_MASK_MARGIN_REL,
    FP16_MIN_COSINE,
    FP16_REL_TOL,
    FP32_REL_TOL,
    MASK_MARGIN_MIN_REL,
    OUTPUT_EMBEDDING,
    OUTPUT_EMBEDDING_UNPATCHED,
    OUTPUT_MASK,
)
from itae_export.registry import GROUP_CODES
from itae_export.runtime import ort_session, run_onnx

_GROUP_MINORITY, _GROUP_BELOW, _GROUP_ABOVE = (GROUP_CODES[g] for g in ("minority", "below", "above"))


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[tuple[str, "object"], ...]:
    """(name, PIL image) of the photos scikit-learn and (if installed) scikit-image ship."""
    from PIL import Image

    photos = []
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    for fname, arr in zip(data.filenames, data.images):
        photos.append((f"sklearn:{Path(fname).name}", Image.fromarray(arr)))
    try:
        import skimage.data as skd
    except ImportError:
        return tuple(photos)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"):
        try:
            photos.append((f"skimage:{name}", Image.fromarray(getattr(skd, name)())))
        except Exception:  # noqa: BLE001 - a missing sample file is not a validation failure
            continue
    return tuple(photos)


def preprocess(img, prep: dict) -> np.ndarray:
    """PIL image -> float32 [3, H, W] per the manifest, with the same code as itae-cluster."""

    return _preprocess(to_rgb(img), PreprocessSpec.from_manifest(prep))


def noise_images(h: int, w: int, n: int, seed: int = 0) -> list:
    """``n`` RGB images of uniform pixel noise (PIL), preprocessed like photos: inputs a real
    image could give, unlike N(0, 1) tensors."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def item_name(item) -> str:
    """How validation reports an image: its file, or for a tar member its WebDataset key beside the
    tar (``shards/x.tar/sample``)."""
    return item.path if item.offset < 0 else str(Path(item.path).parent / item.key)


def validation_inputs(manifest: dict, images_dir: str | os.PathLike | None = None, n_random: int = 4,
                      seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Noise images, the bundled sample photos, and optionally a folder of images."""
    prep = manifest["preprocessing"]
    h, w = prep["resolution"]
    xs = [preprocess(img, prep) for img in noise_images(h, w, n_random, seed)]
    names = [f"noise:{i}" for i in range(n_random)]
    for name, img in sample_photos():
        xs.append(preprocess(img, prep))
        names.append(name)
    if images_dir is not None:  # any input of the source layer; unreadable images are skipped, as in itae-cluster
        items, _ = source_items(images_dir, "--validate-images")
        ok, arrays, _ = load_items(items, PreprocessSpec.from_manifest(prep))
        xs += arrays
        names += [item_name(it) for it in ok]
    return np.stack(xs).astype(np.float32), names


# ----------------------------------------------------------------------------- PyTorch runs


def _forward(model, x: np.ndarray, dtype, masks: np.ndarray | None = None, batch_size: int = 8):
    """(embedding as float64, artifact mask, norms as float64 or None) of ``model`` in ``dtype``;
    ``masks``: replay these artifact masks instead of computing them."""
    import torch

    embs, ms, ns = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            px = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(dtype)
            given = None if masks is None else torch.from_numpy(np.ascontiguousarray(masks[i : i + batch_size]))
            f = model.forward_features(px, cls_only=True, artifact_mask=given)
            embs.append(f["embedding"].double().numpy())
            ms.append(f["artifact_mask"].numpy())
            if "norms" in f:
                ns.append(f["norms"].double().numpy())
    return np.concatenate(embs), np.concatenate(ms), (np.concatenate(ns) if ns else None)


@contextlib.contextmanager
def in_float64(model):
    """The model converted to float64 in place, and back on exit. float32 -> float64 -> float32
    is exact, so the weights come back bit for bit, and no second copy of a multi-GB model is held."""
    import torch

    dtype = next(model.parameters()).dtype
    model.to(torch.float64)
    try:
        yield model
    finally:
        model.to(dtype)


def _rel(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    return float(np.abs(a - b).max()) / scale if len(a) else 0.0


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-300)
    return float(cos.min()) if len(cos) else 1.0


@dataclasses.dataclass
class Reference:
    """The float64 PyTorch run that a graph is judged against, and float32 PyTorch beside it."""

    x: np.ndarray
    names: list[str]
    emb64: np.ndarray
    mask64: np.ndarray
    norms64: np.ndarray | None  # None when ITAE is off
    emb32: np.ndarray  # float32 PyTorch as it runs (its own mask)
    mask32: np.ndarray
    float32: dict  # float32 PyTorch against float64, its mask replaced by the float64 one
    replays: dict = dataclasses.field(default_factory=dict)  # (input, mask bytes) -> float64 embedding
    emb64_unpatched: np.ndarray | None = None  # float64 CLS embedding without the edit (when the graph has it)

    def unpatched64(self, model, batch_size: int = 8) -> np.ndarray:
        """The float64 embeddings without the ITAE edit (the graph's ``embedding_unpatched``), computed once."""
        if self.emb64_unpatched is None:
            import torch

            out = []
            with in_float64(model), torch.no_grad():
                for i in range(0, len(self.x), batch_size):
                    px = torch.from_numpy(np.ascontiguousarray(self.x[i : i + batch_size])).double()
                    out.append(model.forward_features(px, cls_only=True, unpatched=True)["embedding_unpatched"]
                               .double().numpy())
            self.emb64_unpatched = np.concatenate(out)
        return self.emb64_unpatched

    @property
    def scale(self) -> float:
        return float(np.abs(self.emb64).max()) or 1.0

    def float64_with_masks(self, model, idx: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The float64 embeddings of inputs ``idx`` with the given masks replayed (memoised)."""
        keys = [(int(i), m.tobytes()) for i, m in zip(idx, masks)]
        todo = [k for k in range(len(keys)) if keys[k] not in self.replays]
        if todo:
            import torch

            with in_float64(model):
                emb, _, _ = _forward(model, self.x[idx[todo]], torch.float64, masks=masks[todo])
            for k, e in zip(todo, emb):
                self.replays[keys[k]] = e
        return np.stack([self.replays[k] for k in keys]) if keys else np.zeros((0, self.emb64.shape[1]))


def torch_reference(model, manifest: dict, images_dir=None) -> Reference:
    """The inputs and the PyTorch runs that :func:`validate_model` judges a graph by: float64 (the
    reference) and float32 (the measure of what float32 can reach on these inputs). When ITAE is on
    and no input has a flagged token at theta, inputs constructed to have some are added
    (:func:`constructed_inputs`), so that the patched path is compared too."""
    x, names = validation_inputs(manifest, images_dir)
    ref = reference_for(model, x, names)
    if itae_active(manifest) and not ref.mask64.any():
        cx, cnames = constructed_inputs(model, manifest, x)
        if len(cx):
            ref = merge_references(ref, reference_for(model, cx, cnames))
    return ref


CONSTRUCTED = "constructed:"  # the name prefix of the inputs made to put tokens across theta
NOISE = "noise:"


def itae_active(manifest: dict) -> bool:
    return bool(manifest["itae"].get("enabled", True))


def _query_norms(model, px, source: str):
    """Differentiable last-block norms [B, T-1] of ``source`` (query, key or value), as Eq. 2."""
    import torch

    x = model.prepare_tokens(px)
    for blk in model.blocks[:-1]:
        x = blk(x)
    last = model.blocks[-1]
    C = x.shape[-1]
    q, k, v = last.attn.qkv(last.norm1(x)).split(C, dim=-1)
    p = {"query": q, "key": k, "value": v}[source]
    d = C // last.attn.num_heads  # the same norms as itae::artifact_mask, with a gradient
    return ((p[:, 1:] * d**-0.5) ** 2).sum(-1).sqrt()


def constructed_inputs(model, manifest: dict, x: np.ndarray, *, n: int = 2, tokens: int = 4, steps: int = 30,
                       overshoot: float = 0.1) -> tuple[np.ndarray, list[str]]:
    """Inputs whose artifact mask is not empty at theta: starting from the first ``n`` inputs, the
    pixels are moved by gradient steps until ``tokens`` tokens lie ``overshoot`` (relative) beyond
    theta on the side that the group mode flags (above theta when the inputs' norms all lie below,
    and the other way round). Returns none for source=output (its norms need the block's output)."""
    import torch

    itae = manifest["itae"]
    source, theta = itae.get("source", "query"), float(itae["theta"])
    if source not in ("query", "key", "value") or not len(x):
        return np.zeros((0,) + x.shape[1:], np.float32), []
    group = int(itae.get("group_code", GROUP_CODES.get(itae.get("group", "minority"), 0)))
    px = torch.from_numpy(np.ascontiguousarray(x[:n])).float()
    with torch.no_grad():
        start = _query_norms(model, px, source)
    # which side to push a few tokens to: the side that has (almost) none of them
    up = group == _GROUP_ABOVE or (group == _GROUP_MINORITY and bool((start <= theta).float().mean() >= 0.5))
    target = theta * (1 + overshoot) if up else theta * (1 - overshoot)
    order = start.argsort(dim=1, descending=up)[:, :tokens]  # the tokens nearest that side move
    delta = torch.zeros_like(px, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.1)
    for _ in range(steps):
        norms = _query_norms(model, px + delta, source).gather(1, order)
        gap = (target - norms).clamp(min=0) if up else (norms - target).clamp(min=0)
        if not bool((gap > 0).any()):
            break
        (delta.grad,) = torch.autograd.grad(gap.sum(), delta)  # the pixels only: no weight gradients
        opt.step()
    out = (px + delta).detach().numpy().astype(np.float32)
    side = "above" if up else "below"
    return out, [f"{CONSTRUCTED}{side}-theta:{i}" for i in range(len(out))]


def merge_references(a: Reference, b: Reference) -> Reference:
    """One reference over the inputs of both (their float32 measures combined conservatively)."""
    cat = np.concatenate
    f32 = {"rel_max_abs_diff": max(a.float32["rel_max_abs_diff"] * a.scale, b.float32["rel_max_abs_diff"] * b.scale),
           "min_cosine": min(a.float32["min_cosine"], b.float32["min_cosine"]),
           "mask_mismatch": a.float32["mask_mismatch"] + b.float32["mask_mismatch"],
           "norm_rel_err": max(a.float32["norm_rel_err"], b.float32["norm_rel_err"])}
    norms = None if a.norms64 is None or b.norms64 is None else cat([a.norms64, b.norms64])
    ref = Reference(cat([a.x, b.x]), a.names + b.names, cat([a.emb64, b.emb64]), cat([a.mask64, b.mask64]), norms,
                    cat([a.emb32, b.emb32]), cat([a.mask32, b.mask32]), f32)
    ref.float32["rel_max_abs_diff"] /= ref.scale  # relative to the merged scale
    return ref


def exercised(ref: Reference, manifest: dict) -> dict:
    """What the validation inputs put through the patched path: flagged tokens and the inputs with any."""
    counts = counts_from_masks(ref.mask64)
    constructed = [i for i, nm in enumerate(ref.names) if nm.startswith(CONSTRUCTED)]
    return {"itae_enabled": itae_active(manifest), "mask_tokens": int(counts.sum()),
            "inputs": int((counts > 0).sum()), "of_inputs": int(len(counts)),
            "constructed_inputs": len(constructed),
            "constructed_with_mask": int((counts[constructed] > 0).sum()) if constructed else 0}


def image_artifacts(ref: Reference, manifest: dict) -> dict:
    """The artifact statistics of the validation images (photos and --validate-images; not the
    noise or constructed inputs), with the sanity rule of :mod:`itae_export.cluster.artifacts`."""
    keep = [i for i, nm in enumerate(ref.names) if not nm.startswith((NOISE, CONSTRUCTED))]
    return artifact_stats(counts_from_masks(ref.mask64[keep]), ref.mask64.shape[1], theta=manifest["itae"]["theta"],
                          enabled=itae_active(manifest))


def reference_for(model, x: np.ndarray, names: list[str]) -> Reference:
    """The float64 and float32 PyTorch runs over the pixels ``x`` (named ``names``)."""
    import torch

    with in_float64(model):
        emb64, mask64, norms64 = _forward(model, x, torch.float64)
    emb32, mask32, norms32 = _forward(model, x, torch.float32)
    ref = Reference(x, names, emb64, mask64, norms64, emb32, mask32, {})
    same = emb32.copy()
    differ = np.flatnonzero((mask32 != mask64).any(1))
    if len(differ):  # judge float32's arithmetic, not its side of theta: replay the float64 mask
        same[differ] = _forward(model, x[differ], torch.float32, masks=mask64[differ])[0]
    norm_err = 0.0
    if norms64 is not None and norms64.size:
        norm_err = float((np.abs(norms32 - norms64) / np.maximum(np.abs(norms64), 1e-30)).max())
    ref.float32 = {
        "rel_max_abs_diff": _rel(same, emb64, ref.scale),
        "min_cosine": _min_cosine(same, emb64),
        "mask_mismatch": int((mask32 != mask64).sum()),
        "norm_rel_err": norm_err,
    }
    return ref


def run_torch(model, x: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """float32 PyTorch outputs of ``model`` on ``x`` (the contract's output names)."""
    import torch

    emb, mask, _ = _forward(model, x, torch.float32, batch_size=batch_size)
    return {OUTPUT_EMBEDDING: emb.astype(np.float32), OUTPUT_MASK: mask}


# ----------------------------------------------------------------------------- the gate


def mask_explained(got: np.ndarray, norms: np.ndarray, theta: float, group: int, margin: float) -> bool:
    """Is ``got`` (one input's mask) what Eq. 3-4 give when every token whose float64 norm lies
    within ``margin`` of theta may fall on either side, the others on their float64 side?"""
    got = np.asarray(got, bool)
    near = np.abs(norms - theta) <= margin
    below = norms <= theta
    far = ~near
    if group == _GROUP_BELOW:
        return bool((got[far] == below[far]).all())
    if group == _GROUP_ABOVE:
        return bool((got[far] == ~below[far]).all())
    n, k = got.size, int(got.sum())
    if k == 0:  # no artifacts: only if every token can be put on one side
        return bool(below[far].all() or (~below[far]).all())
    # got is La (needs |La| <= |Lb|), or got is Lb (needs |La| > |Lb|); the far tokens must agree
    as_below = k <= n - k and bool((got[far] == below[far]).all())
    as_above = n - k > k and bool((~got[far] == below[far]).all())
    return as_below or as_above


def mask_margin(manifest: dict, ref: Reference) -> tuple[float, float]:
    """(absolute margin around theta, the same relative to theta) for this manifest's precision."""
    floor = MASK_MARGIN_MIN_REL if manifest["precision"] == "fp32" else FP16_MASK_MARGIN_REL
    rel = max(floor, FLOAT32_REACH * ref.float32.get("norm_rel_err", 0.0))
    return rel * abs(float(manifest["itae"]["theta"])), rel


def judge(ref: Reference, got_emb, got_mask, manifest: dict, model) -> dict:
    """The numbers of the validation report and its verdict (the gate of docs/onnx-contract.md)."""
    precision = manifest["precision"]
    itae = manifest["itae"]
    theta = float(itae["theta"])
    group = int(itae.get("group_code", GROUP_CODES.get(itae.get("group", "minority"), 0)))
    got_emb = np.asarray(got_emb, np.float64)
    got_mask = np.asarray(got_mask, bool)
    scale = ref.scale
    margin, margin_rel = mask_margin(manifest, ref)

    flips, unexplained = [], []
    for i in np.flatnonzero((got_mask != ref.mask64).any(1)):
        entry = {"input": ref.names[i], "tokens": np.flatnonzero(got_mask[i] != ref.mask64[i]).tolist()}
        if ref.norms64 is not None:
            entry["near_theta"] = np.flatnonzero(np.abs(ref.norms64[i] - theta) <= margin).tolist()
        ok = ref.norms64 is not None and mask_explained(got_mask[i], ref.norms64[i], theta, group, margin)
        (flips if ok else unexplained).append((int(i), entry))
    target = ref.emb64.copy()  # float64 PyTorch with the graph's mask where a flip is allowed
    if flips:
        idx = np.array([i for i, _ in flips])
        target[idx] = ref.float64_with_masks(model, idx, got_mask[idx])

    finite = bool(np.isfinite(got_emb).all())
    max_abs = float(np.abs(target - got_emb).max()) if finite else float("inf")
    min_cos = _min_cosine(target, got_emb) if finite else float("nan")
    mismatch = int((got_mask != ref.mask64).sum())
    f32 = ref.float32
    floor = FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL
    tol_rel = max(floor, FLOAT32_REACH * f32["rel_max_abs_diff"])
    tol = {
        "reference": "float64 PyTorch",
        "rel_max_abs_diff": tol_rel,
        "rel_max_abs_diff_rule": f"max({floor:g}, {FLOAT32_REACH:g} x float32 PyTorch's {f32['rel_max_abs_diff']:.3g})",
        "mask_margin": margin,
        "mask_margin_rel": margin_rel,
    }
    report = {
        "precision": precision,
        "reference": "float64 PyTorch",
        "n_inputs": int(len(got_emb)),
        "max_abs_diff": max_abs,
        "output_scale": scale,
        "rel_max_abs_diff": max_abs / scale,
        "min_cosine": min_cos,
        "mask_mismatch": mismatch,
        "mask_tokens": int(ref.mask64.size),
        "mask_flips": {"inputs": len(flips), "tokens": sum(len(e["tokens"]) for _, e in flips),
                       "within_margin": [e for _, e in flips]},
        "artifacts_per_input": [int(v) for v in ref.mask64.sum(1)],
        "finite": finite,
        "float32_torch": dict(f32),
        "vs_float32_torch": {  # the old gate's numbers: the graph against float32 PyTorch as it runs
            "rel_max_abs_diff": (float(np.abs(ref.emb32 - got_emb).max()) / (float(np.abs(ref.emb32).max()) or 1.0)
                                 if finite else float("inf")),
            "mask_mismatch": int((got_mask != ref.mask32).sum()),
        },
    }
    k = min(4, len(got_emb) - 1)  # independent K-Means runs on both, the same seed
    report["kmeans_ari"] = kmeans_ari(l2_normalize(ref.emb64), l2_normalize(got_emb), k)[1] if finite and k >= 2 else None

    failure = _failure(finite, unexplained, margin, max_abs, scale, tol, precision, min_cos, f32)
    report["tolerance"] = tol
    report["passed"] = failure is None
    report["failure"] = failure
    return report


def _failure(finite: bool, unexplained: list, margin: float, max_abs: float, scale: float, tol: dict, precision: str,
             min_cos: float, f32: dict) -> str | None:
    """The gate's verdict: why the graph fails, or None. Sets ``tol["min_cosine"]`` for fp16."""
    if not finite:
        return "the ONNX embedding has NaN or inf"
    if unexplained:
        i, e = unexplained[0]
        n_tok = sum(len(e["tokens"]) for _, e in unexplained)
        return (f"{n_tok} artifact-mask tokens of {len(unexplained)} inputs differ from float64 PyTorch away from "
                f"theta (margin {margin:.3g}); first: {e['input']} tokens {e['tokens'][:8]}")
    tol_rel = tol["rel_max_abs_diff"]
    if max_abs / scale > tol_rel:
        return (f"embedding max abs diff {max_abs:.3g} is {max_abs / scale:.3g} of the output scale "
                f"(> {tol['rel_max_abs_diff_rule']} = {tol_rel:.3g})")
    if precision != "fp32":
        cos_floor = min(FP16_MIN_COSINE, 1 - FLOAT32_REACH * (1 - f32["min_cosine"]))
        tol["min_cosine"] = cos_floor
        if min_cos < cos_floor:
            return f"fp16 min cosine {min_cos:.5f} < {cos_floor:.5f}"
    return None


def judge_unpatched(report: dict, ref: Reference, got: np.ndarray, model) -> None:
    """The optional ``embedding_unpatched`` output against float64 PyTorch without the edit, at the
    embedding's tolerance; fails the report when it is off."""
    want = ref.unpatched64(model)
    got = np.asarray(got, np.float64)
    scale = float(np.abs(want).max()) or 1.0
    rel = float(np.abs(want - got).max()) / scale if np.isfinite(got).all() else float("inf")
    tol = report["tolerance"]["rel_max_abs_diff"]
    report["unpatched"] = {"rel_max_abs_diff": rel, "min_cosine": _min_cosine(want, got), "tolerance": tol}
    if not rel <= tol:
        report["passed"] = False
        report["failure"] = f"{OUTPUT_EMBEDDING_UNPATCHED}: max abs diff {rel:.3g} of the output scale (> {tol:.3g})"


def validate_model(onnx_path, model, manifest: dict, *, images_dir=None, log: Callable[[str], None] = lambda m: None,
                   batch_sizes: tuple[int, ...] = (1, 3), reference: Reference | None = None) -> dict:
    """Judge ONNX Runtime's outputs against float64 PyTorch, at each batch size; the report also
    says which inputs were used. ``reference``: a :func:`torch_reference` already computed for
    this model and manifest (``model`` must have ITAE injected, as every exported model has)."""
    ref = reference or torch_reference(model, manifest, images_dir)
    sess = ort_session(onnx_path)
    report = None
    per_batch = {}
    for bs in batch_sizes:
        got = run_onnx(sess, ref.x, batch_size=bs)
        r = judge(ref, got[OUTPUT_EMBEDDING], got[OUTPUT_MASK], manifest, model)
        if OUTPUT_EMBEDDING_UNPATCHED in got and r["passed"]:
            judge_unpatched(r, ref, got[OUTPUT_EMBEDDING_UNPATCHED], model)
        per_batch[str(bs)] = {k: r[k] for k in ("max_abs_diff", "min_cosine", "mask_mismatch", "passed")}
        per_batch[str(bs)]["mask_flips"] = r["mask_flips"]["tokens"]
        if report is None or not r["passed"]:
            report = r
        if not r["passed"]:
            break
    report["batch_sizes"] = per_batch
    report["inputs"] = ref.names
    report["exercised"] = exercised(ref, manifest)
    report["artifacts"] = image_artifacts(ref, manifest)
    log(format_report(report))
    if report["artifacts"].get("warning"):
        log(report["artifacts"]["warning"] + " (counted on the validation photos)")
    return report


def format_report(r: dict) -> str:
    if r.get("skipped"):
        return "validation: skipped"
    ari = "n/a" if r.get("kmeans_ari") is None else f"{r['kmeans_ari']:.3f}"
    verdict = "PASSED" if r["passed"] else f"FAILED ({r['failure']})"
    ref = r.get("reference", "PyTorch")
    ex = r.get("exercised")
    if r["passed"] and ex and ex["itae_enabled"] and not ex["mask_tokens"]:
        verdict = "PASSED for the unpatched path only (ITAE NOT exercised)"
    line = (
        f"validation {verdict}: {r['n_inputs']} inputs against {ref}, embedding max abs diff {r['max_abs_diff']:.3g} "
        f"({r['rel_max_abs_diff']:.3g} of scale), min cosine {r['min_cosine']:.6f}, "
        f"mask tokens differing {r['mask_mismatch']}/{r['mask_tokens']} (within the margin of theta: "
        f"{r.get('mask_flips', {}).get('tokens', 0)}), K-Means ARI {ari}"
    )
    return line + (f"; {format_exercised(ex)}" if ex else "")


def format_exercised(ex: dict) -> str:
    """How much of the patched path the validation compared: flagged (attenuated) tokens and inputs."""
    if not ex["itae_enabled"]:
        return "ITAE off: no mask to exercise"
    if not ex["mask_tokens"]:
        return ("no validation input had a flagged token at this theta, so the ITAE edit was not compared with "
                "PyTorch (pass --validate-images with images that have artifacts, or see itae-inspect)")
    made = f", {ex['constructed_with_mask']} of them constructed to cross theta" if ex["constructed_inputs"] else ""
    return f"ITAE exercised on {ex['mask_tokens']} mask tokens in {ex['inputs']} of {ex['of_inputs']} inputs{made}"
