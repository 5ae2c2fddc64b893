"""Faster graphs for ONNX Runtime, each one validated before it is published.

- :func:`fold_layerscale_`: LayerScale folded into the Linear before it (``W' = diag(g) W``,
  ``b' = g * b``), in the PyTorch model that is exported. One Mul less per residual branch.
- :func:`fuse_for_ort`: onnxscript's ORT fusions on the exported graph: ``MultiHeadAttention``
  for the unpatched blocks, ``SkipLayerNormalization``, ``BiasGelu`` (``com.microsoft`` ops, so
  the result runs in ONNX Runtime only). The ``itae`` functions are detached while the rewriter
  runs, so it cannot inline or rewrite them, and attached again unchanged.
- :func:`quantize_int8`: dynamic int8 quantization of the weight MatMuls. The MatMul whose output
  feeds ``ArtifactMask`` stays float32, so the norms and the threshold are those of the fp32
  graph; ``ArtifactMask`` and ``AttenuateLogits`` are functions and are never quantized.
- :func:`validate_int8`: cosine to the fp32 graph's embeddings, artifact-mask agreement, and the
  ARI between fp32 and int8 K-Means assignments of real images; below :data:`INT8_MIN_ARI` it fails.

ORT's own session-level optimizations (``ORT_ENABLE_ALL``) still run when a session opens. The
result of those is not shipped: at that level ORT adds hardware-specific layouts (NCHWc), and the
saved model is only valid on the machine that wrote it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export import fashion_mnist
from itae_export.cluster.metrics import kmeans_ari, l2_normalize
from itae_export.errors import InputError
from itae_export.images import load_images, sample_evenly, scan_images
from itae_export.model.vit import LayerScale
from itae_export.onnx.contract import INT8_MIN_ARI, ITAE_DOMAIN, OUTPUT_EMBEDDING, OUTPUT_MASK
from itae_export.onnx.validate import preprocess, validation_inputs
from itae_export.runtime import run_onnx

# ---------------------------------------------------------------- PyTorch side


def fold_layerscale_(model) -> int:
    """Fold each block's LayerScale into the Linear that precedes it, in place; returns how many.

    ``ls1`` follows ``attn.proj``; ``ls2`` follows ``mlp.fc2`` (or ``mlp.w3`` for SwiGLU).
    """
    import torch
    from torch import nn


    folded = 0
    with torch.no_grad():
        for blk in model.blocks:
            last_mlp = blk.mlp.fc2 if hasattr(blk.mlp, "fc2") else blk.mlp.w3
            for ls_name, linear in (("ls1", blk.attn.proj), ("ls2", last_mlp)):
                ls = getattr(blk, ls_name)
                if not isinstance(ls, LayerScale):
                    continue
                g = ls.gamma.detach().to(linear.weight.dtype)
                linear.weight.mul_(g[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(g)
                setattr(blk, ls_name, nn.Identity())
                folded += 1
    return folded


# ---------------------------------------------------------------- graph fusions


def fuse_for_ort(src: str | os.PathLike, dst: str | os.PathLike, *, external: bool = False) -> dict[str, int]:
    """Apply onnxscript's ORT transformer fusions to ``src`` and write ``dst``; returns the fusion counts.

    The ``itae`` local functions are taken out first (their nodes then look like opaque custom
    ops, which no rule matches and nothing inlines) and put back after.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    kept = {key: fn for key, fn in model.functions.items() if key[0] == ITAE_DOMAIN}
    for key in kept:
        del model.functions[key]
    model, counts = optimize_for_ort(model)
    for key, fn in kept.items():
        model.functions[key] = fn
    used = {(n.domain, n.op_type) for n in model.graph}
    missing = [f"{d}::{op}" for d, op, *_ in kept if (d, op) not in used]
    if missing:
        raise RuntimeError(f"the ORT fusions removed the itae nodes {missing}")
    model.opset_imports.setdefault(ITAE_DOMAIN, 1)
    dst = Path(dst)
    ir.save(model, str(dst), external_data=(dst.name + ".data") if external else None)
    return {k: int(v) for k, v in counts.items() if v}


# ---------------------------------------------------------------- int8


def mask_source_matmuls(proto) -> list[str]:
    """Names of the MatMul nodes whose output reaches an ``ArtifactMask`` input through
    reshapes, slices, splits and bias adds only (the last block's qkv projection)."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    passthrough = {"Add", "Slice", "Split", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Identity"}
    found: list[str] = []
    for node in proto.graph.node:
        if node.domain != ITAE_DOMAIN or node.op_type != "ArtifactMask":
            continue
        stack, seen = [node.input[0]], set()
        while stack:
            p = producers.get(stack.pop())
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.op_type in ("MatMul", "Gemm"):
                found.append(p.name)
            elif p.op_type in passthrough:
                stack.extend(i for i in p.input if i)
    return sorted(set(found))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = True,
                  keep_mask_source_fp32: bool = True, external: bool = False,
                  weight_type: str = "int8", reduce_range: bool = False) -> dict:
    """Dynamic int8 quantization of the weight MatMuls of ``src`` (activation x activation
    MatMuls stay float32); returns what was done, for the manifest. Per-channel weight scales by
    default: with per-tensor scales the real DINOv2 ViT-S/14 fell to a min cosine of 0.19 to fp32
    on Fashion-MNIST, per channel 0.95 (mean 0.996).

    ``weight_type`` "uint8" (u8u8 kernels) and ``reduce_range`` (7-bit weights) avoid the int16
    saturation of the u8s8 AVX2 kernels on CPUs without VNNI; both are slower or coarser there
    (``bench/bench_int8.py`` measures them), so the default stays int8 weights, full range."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qtypes = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if weight_type not in qtypes:
        raise ValueError(f"weight_type: {weight_type!r} is not one of {', '.join(qtypes)}")
    src = Path(src)
    proto = onnx.load(str(src), load_external_data=False)
    unnamed = [n for n in proto.graph.node if not n.name]
    named_copy = None
    if unnamed:  # nodes_to_exclude needs names: a named copy beside src (its external data resolves the same)
        for i, n in enumerate(unnamed):
            n.name = f"_unnamed_{n.op_type}_{i}"
        fd, named_copy = tempfile.mkstemp(dir=src.parent, prefix=f".{src.stem}.named.", suffix=".onnx")
        os.close(fd)
        onnx.save_model(proto, named_copy)
    excluded = mask_source_matmuls(proto) if keep_mask_source_fp32 else []
    initializers = {t.name for t in proto.graph.initializer}
    weight_matmuls = sum(1 for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in initializers)
    try:
        quantize_dynamic(named_copy or str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                         weight_type=qtypes[weight_type], reduce_range=reduce_range, nodes_to_exclude=excluded,
                         use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
    finally:
        if named_copy:
            os.unlink(named_copy)
    weights = "int8 (symmetric)" if weight_type == "int8" else "uint8 (asymmetric)"
    return {"method": "onnxruntime.quantization.quantize_dynamic",
            "weights": weights + (", 7-bit range" if reduce_range else ""),
            "activations": "uint8, dynamic per tensor", "per_channel": per_channel,
            "ops": ["MatMul with constant weights"], "weight_matmuls": weight_matmuls,
            "kept_fp32": excluded, "mask_source_fp32": bool(excluded)}


def real_images(images_dir: str | os.PathLike | None, manifest: dict, n: int = 256) -> tuple[np.ndarray, int, str]:
    """(pixels [n, 3, H, W], k, description) of real images for the int8 ARI check.

    ``images_dir``: its images (k = the number of class sub-folders, else 10). Otherwise the
    Fashion-MNIST test split where installed (Debian's dataset-fashion-mnist, or the folder in
    ``$ITAE_FASHION_MNIST``), an even share of each class, k = 10.
    """
    from PIL import Image


    prep = manifest["preprocessing"]
    if images_dir is not None:
        root = Path(images_dir)
        files = scan_images(root)
        classes = {p.parent for p in files if p.parent != root}
        _, xs, _ = load_images(sample_evenly(files, n), prep)  # unreadable files are skipped, as in itae-cluster
        k = len(classes) if len(classes) >= 2 else 10
        if len(xs) < 2 * k:
            raise InputError(f"--validate-images: {root} has {len(xs)} readable images; the int8 check needs "
                             f"at least {2 * k}")
        return np.stack(xs), k, f"{len(xs)} images of {root}"

    if not fashion_mnist.available():
        raise InputError("--quantize int8 checks the clustering on real images: pass --validate-images DIR "
                         f"(no Fashion-MNIST at {fashion_mnist.ROOT}; set ITAE_FASHION_MNIST)")
    x, y = fashion_mnist.load()
    per_class = max(1, n // 10)
    pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    xs = [preprocess(Image.fromarray(x[i]).convert("RGB"), prep) for i in pick]
    return np.stack(xs), 10, f"{len(xs)} Fashion-MNIST test images ({per_class} per class)"


def validate_int8(fp32_path, int8_path, manifest: dict, *, images_dir=None, n_images: int = 256,
                  min_ari: float | None = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Compare the int8 graph with the (already validated) fp32 graph; the report's ``passed``
    is False when the K-Means assignments of real images agree with ARI < ``min_ari``."""

    min_ari = INT8_MIN_ARI if min_ari is None else min_ari
    x_val, _ = validation_inputs(manifest, None)
    x_real, k, what = real_images(images_dir, manifest, n_images)
    x = np.concatenate([x_val, x_real])
    ref = run_onnx(fp32_path, x, batch_size=16)
    got = run_onnx(int8_path, x, batch_size=16)
    a = np.asarray(ref[OUTPUT_EMBEDDING], np.float64)
    b = np.asarray(got[OUTPUT_EMBEDDING], np.float64)
    finite = bool(np.isfinite(b).all())
    cos = (l2_normalize(a) * l2_normalize(b)).sum(1) if finite else np.array([np.nan])
    mask_agree = float((ref[OUTPUT_MASK] == got[OUTPUT_MASK]).mean())
    ari = ari_independent = None
    if finite:  # the guard's ARI is the warm-started one (see kmeans_ari)
        r = len(x_val)
        ari, ari_independent = kmeans_ari(l2_normalize(a[r:]), l2_normalize(b[r:]), k)
    failure = None
    if not finite:
        failure = "the int8 embedding has NaN or inf"
    elif ari < min_ari:
        failure = f"K-Means ARI between fp32 and int8 assignments is {ari:.4f} (< {min_ari})"
    report = {
        "against": "the validated fp32 graph, ONNX Runtime CPU",
        "n_inputs": int(len(x)), "real_images": what, "k": k,
        "min_cosine": float(np.min(cos)), "mean_cosine": float(np.mean(cos)),
        "mask_agreement": mask_agree, "kmeans_ari": ari, "min_ari": min_ari,
        "kmeans_ari_independent_runs": ari_independent,
        "passed": failure is None, "failure": failure,
    }
    log(format_int8_report(report))
    return report


def format_int8_report(r: dict) -> str:
    verdict = "PASSED" if r["passed"] else f"FAILED ({r['failure']})"
    ari = "n/a" if r["kmeans_ari"] is None else f"{r['kmeans_ari']:.4f}"
    return (f"int8 validation {verdict}: {r['n_inputs']} inputs ({r['real_images']}), cosine to fp32 min "
            f"{r['min_cosine']:.5f} mean {r['mean_cosine']:.5f}, artifact-mask agreement {r['mask_agreement']:.4%}, "
            f"K-Means ARI fp32 vs int8 {ari} (k={r['k']}, needs >= {r['min_ari']})")
