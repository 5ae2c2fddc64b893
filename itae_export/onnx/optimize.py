"""Faster graphs for ONNX Runtime, each one validated before it is published.

- :func:`fold_layerscale_`: LayerScale folded into the Linear before it (``W' = diag(g) W``,
  ``b' = g * b``), in the PyTorch model that is exported. One Mul less per residual branch.
- :func:`fuse_for_ort`: onnxscript's ORT fusions on the exported graph, all of them or the groups
  of :data:`FUSION_GROUPS` (``SkipLayerNormalization``, ``MultiHeadAttention`` for the unpatched
  blocks, ``BiasGelu``; ``com.microsoft`` ops, so the result runs in ONNX Runtime only). The
  ``itae`` functions are detached while the rewriter runs, so it cannot inline or rewrite them,
  and attached again unchanged.
- :func:`choose_fusions`: ``--optimize`` times every candidate set of fusion groups against none
  on the CPU at hand and keeps the fastest; the manifest records the timings and the CPU kind
  (:mod:`itae_export.hardware`), since another kind may choose otherwise.
- :func:`quantize_int8`: dynamic int8 quantization of the weight MatMuls (``--quantize int8``).
- :func:`quantize_static_int8` and :func:`plan_static_int8` (``--quantize int8-static``): static
  QDQ int8 calibrated on real images, per-channel weights, with the layers that move the clusters
  most, measured end to end one layer at a time, kept float32 (as few as the clusters allow).
  :func:`smooth_activations` (SmoothQuant, folded into the LayerNorms) runs first.
- In both, the MatMul whose output feeds ``ArtifactMask`` stays float32, so the norms and the
  threshold are those of the fp32 graph; ``ArtifactMask`` and ``AttenuateLogits`` are functions
  and are never quantized.
- :func:`validate_int8`: cosine to the fp32 graph's embeddings, artifact-mask agreement, and the
  ARI between fp32 and int8 K-Means assignments of real images; below :data:`INT8_MIN_ARI` it fails.
  It also records what a user loses on those images: the share of each image's 10 nearest
  neighbours that int8 keeps (:func:`neighbour_overlap`) and the share of images that keep their
  fp32 K-Means centroid (:func:`centroid_kept`).

ORT's own session-level optimizations (``ORT_ENABLE_ALL``) still run when a session opens. The
result of those is not shipped: at that level ORT adds hardware-specific layouts (NCHWc), and the
saved model is only valid on the machine that wrote it.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from itae_export import fashion_mnist, hardware
from itae_export.cluster.metrics import kmeans_ari, l2_normalize
from itae_export.errors import InputError, ToleranceError
from itae_export.data.embed import item_class, load_items, source_items
from itae_export.images import PreprocessSpec
from itae_export.model.vit import LayerScale
from itae_export.onnx.contract import (
    INT8_MIN_ARI,
    ITAE_DOMAIN,
    OUTPUT_EMBEDDING,
    OUTPUT_MASK,
    external_data_name,
)
from itae_export.onnx.manifest import external_locations
from itae_export.onnx.validate import preprocess, validation_inputs
from itae_export.runtime import ort_session, run_onnx

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


#: The groups of onnxscript's ORT fusions that ``--optimize`` can keep or drop, by CPU measurement.
FUSION_GROUPS = ("skip_layer_norm", "attention", "gelu")
#: Candidates :func:`choose_fusions` times at export, besides none: every group, and every group but one.
FUSION_CANDIDATES = (FUSION_GROUPS, ("skip_layer_norm", "gelu"), ("attention", "gelu"), ("skip_layer_norm", "attention"))


def _fuse_groups(model, groups) -> dict[str, int]:
    """onnxscript's ``optimize_for_ort`` with only the fusion ``groups`` (of :data:`FUSION_GROUPS`);
    the same passes in the same order as its ``fuse_xformers``, the others left out."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import _core
    from onnxscript.rewriter.ort_fusions.attention import fuse_attention
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    bad = set(groups) - set(FUSION_GROUPS)
    if bad:
        raise ValueError(f"unknown fusion groups {sorted(bad)}; known: {', '.join(FUSION_GROUPS)}")
    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    model = _core._pre_optimize(model)
    counts: dict[str, int] = {}
    if "gelu" in groups:
        counts["erf_gelu"] = fuse_erfgelu(model)
    if "skip_layer_norm" in groups:
        counts["skip_layer_normalization"] = fuse_skip_layer_normalization(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    if "attention" in groups:
        counts["sdpa"] = fuse_sdpa(model, apply_shape_inference=True)
        counts["mha1"] = fuse_mha1(model)
        counts["mha2"] = fuse_mha2(model)
        counts["mha_scale"] = fuse_mha_scale(model)
        if counts["mha1"] or counts["mha2"]:
            counts["mha_bias"] = fuse_mha_bias(model)
            counts["attention"] = fuse_attention(model)
    if "gelu" in groups:
        counts["gelu"] = fuse_gelu(model)
        counts["bias_gelu"] = fuse_bias_gelu(model)
    if "attention" in groups:
        counts["sdpa_via_mha"] = replace_sdpa_by_mha(model)
    optimize(model)
    rewrite(model, _core.ORT_PATTERN_REWRITE_RULES)
    ir.passes.Sequential(common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
                         common_passes.RemoveInitializersFromInputsPass(), common_passes.ShapeInferencePass())(model)
    return counts


def fuse_for_ort(src: str | os.PathLike, dst: str | os.PathLike, *, external: bool = False,
                 groups: tuple[str, ...] | None = None) -> dict[str, int]:
    """Apply onnxscript's ORT transformer fusions to ``src`` and write ``dst``; returns the fusion counts.

    ``groups``: only these of :data:`FUSION_GROUPS` (None: onnxscript's ``optimize_for_ort``, all).
    The ``itae`` local functions are taken out first (their nodes then look like opaque custom
    ops, which no rule matches and nothing inlines) and put back after.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    kept = {key: fn for key, fn in model.functions.items() if key[0] == ITAE_DOMAIN}
    for key in kept:
        del model.functions[key]
    if groups is None:
        model, counts = optimize_for_ort(model)
    else:
        counts = _fuse_groups(model, groups)
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


def time_graphs(paths: dict[str, str | os.PathLike], x: np.ndarray, *, turns: int = 5,
                threads: int | None = None) -> dict[str, float]:
    """Fastest seconds per run of each graph on ``x`` over interleaved turns (A B C A B C ...) after
    one warm-up turn, each in an ORT CPU session as ``itae-cluster`` opens it (spinning off). The
    minimum, not the median: on a shared machine the other load only ever adds time, so the
    fastest turn is the closest to what the graph itself costs."""
    import time

    sessions = {name: ort_session(p, intra_op_threads=threads or hardware.read_cpu().physical_cores, spinning=False)
                for name, p in paths.items()}
    feed = {next(iter(sessions.values())).get_inputs()[0].name: x}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for turn in range(turns + 1):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run([OUTPUT_EMBEDDING], feed)
            if turn:
                times[name].append(time.perf_counter() - t0)
    return {n: float(np.min(t)) for n, t in times.items()}


def choose_fusions(src: str | os.PathLike, dst: str | os.PathLike, manifest: dict, *, external: bool = False,
                   candidates=FUSION_CANDIDATES, batch: int = 8, turns: int = 5,
                   log: Callable[[str], None] = lambda m: None) -> dict:
    """``--optimize`` that never loses: fuse ``src`` with each candidate set of fusion groups, time
    them against ``src`` itself (no fusions: ONNX Runtime's own session fusions only) on this CPU
    (random pixels of ``batch`` images, interleaved turns, fastest turn of each: :func:`time_graphs`)
    and write the fastest to ``dst``.

    Returns the decision for the manifest: which groups, the counts, seconds per run of every
    candidate, and the CPU kind it was measured on (another kind may choose otherwise)."""
    import shutil

    src, dst = Path(src), Path(dst)
    h, w = manifest["preprocessing"]["resolution"]
    x = np.random.default_rng(0).standard_normal((batch, 3, h, w), dtype=np.float32)
    paths: dict[str, Path] = {"none": src}
    counts: dict[str, dict] = {"none": {}}
    for groups in candidates:
        name = "+".join(groups)
        paths[name] = dst.with_name(f"{dst.stem}.{name.replace('+', '_')}.onnx")
        counts[name] = fuse_for_ort(src, paths[name], external=external, groups=tuple(groups))
    log(f"timing {len(paths)} fusion choices on this CPU (batch {batch}, {turns} turns) ...")
    secs = time_graphs(paths, x, turns=turns)
    best = min(secs, key=secs.get)
    for name, p in paths.items():
        if name == "none":
            continue
        if name == best:
            os.replace(p, dst)
            if external:
                os.replace(p.with_name(p.name + ".data"), dst.with_name(dst.name + ".data"))
        else:
            p.unlink()
            if external:
                p.with_name(p.name + ".data").unlink(missing_ok=True)
    if best == "none":
        shutil.copyfile(src, dst)  # external data: src's file keeps its location name
        if external:
            data = _external_locations(src)
            for loc in data:
                if (src.parent / loc).resolve() != (dst.parent / loc).resolve():
                    shutil.copyfile(src.parent / loc, dst.parent / loc)
    cpu = hardware.read_cpu()
    return {"chosen": best, "fusions": counts[best], "seconds_per_run": secs, "batch": batch, "turns": turns,
            "vs_none": secs["none"] / secs[best], "cpu_kind": hardware.cpu_kind(cpu), "cpu": cpu.model}


def _external_locations(path: Path) -> list[str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})


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


def weight_matmul_layers(proto) -> list[tuple[str, str]]:
    """[(node name, label)] of the MatMuls with a constant weight, in graph order.

    The label names the layer of the ViT: ``blocks.<i>.attn.qkv`` starts block ``i`` (a [D, 3D]
    weight), then ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` in that order when the block has those
    four (other MLPs: ``blocks.<i>.mm<j>``); MatMuls outside that pattern are ``matmul<j>``.
    Unnamed nodes have no name to exclude them by and are left out."""
    initializers = {t.name: list(t.dims) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name and n.input[1] in initializers]
    blocks: list[list] = []
    loose: list = []
    for n in nodes:
        dims = initializers[n.input[1]]
        if len(dims) == 2 and dims[1] == 3 * dims[0]:
            blocks.append([n])
        elif blocks:
            blocks[-1].append(n)
        else:
            loose.append(n)
    label: dict[str, str] = {n.name: f"matmul{j}" for j, n in enumerate(loose)}
    roles = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    for i, blk in enumerate(blocks):
        for j, n in enumerate(blk):
            label[n.name] = f"blocks.{i}.{roles[j]}" if len(blk) == len(roles) else f"blocks.{i}.mm{j}"
    return [(n.name, label[n.name]) for n in nodes]


def _pixel_reader(pixels: np.ndarray, batch_size: int, input_name: str):
    """An ONNX Runtime CalibrationDataReader over ``pixels`` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class PixelReader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{input_name: pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)])

        def get_next(self):
            return next(self._batches, None)

    return PixelReader()


def quantize_static_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray | None, *,
                         cache: str | os.PathLike, keep_fp32: list[str] | tuple[str, ...] = (),
                         keep_mask_source_fp32: bool = True, per_channel: bool = True, reduce_range: bool = False,
                         batch_size: int = 8) -> dict:
    """Static int8 (QDQ) of the weight MatMuls of ``src``, calibrated on real images; returns what was
    done, for the manifest.

    ONNX Runtime's ``quantize_static``: QDQ format, int8 symmetric weights (per output channel by
    default), uint8 activations with scales from the MinMax of ``calibration`` (pixels [n, 3, H, W]);
    the MatMul outputs are not quantized (ORT quantizes them by default in QDQ; here they go on in
    float32 into the bias adds, the residual and GELU, and ORT runs ``MatMulIntegerToFloat``).
    The ranges are cached in ``cache`` (JSON; computed once, then read back, so that variants with
    other layers kept in float32 share one calibration; pass ``calibration=None`` to use the cache
    only). ``keep_fp32``: node names or :func:`weight_matmul_layers` labels that stay float32; the
    MatMul that feeds ``ArtifactMask`` stays float32 too (``keep_mask_source_fp32``), and the ``itae``
    functions are never touched. Activation x activation MatMuls stay float32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = Path(src)
    proto = onnx.load(str(src), load_external_data=False)
    layers = weight_matmul_layers(proto)
    by_label = {lab: name for name, lab in layers}
    unknown = [k for k in keep_fp32 if k not in by_label and k not in dict(layers)]
    if unknown:
        raise InputError(f"int8 keep_fp32: no weight MatMul named {', '.join(unknown)} in {src}")
    kept = {by_label.get(k, k) for k in keep_fp32}
    mask_src = set(mask_source_matmuls(proto)) if keep_mask_source_fp32 else set()
    kept |= mask_src
    to_quantize = [name for name, _ in layers if name not in kept]
    if calibration is None and not Path(cache).is_file():
        raise InputError(f"int8 calibration: no images given and no calibration cache at {cache}")
    reader = None if calibration is None else _pixel_reader(np.ascontiguousarray(calibration, np.float32), batch_size,
                                                             proto.graph.input[0].name)
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=to_quantize,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                    extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False,
                                   # the MatMul outputs (into the bias adds and the residual) stay float32
                                   "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    label = dict(layers)
    return {"method": "onnxruntime.quantization.quantize_static (QDQ)",
            "weights": "int8 (symmetric)" + (", 7-bit range" if reduce_range else ""),
            "activations": "uint8 (asymmetric), static per tensor, MinMax calibration",
            "calibration_images": None if calibration is None else int(len(calibration)),
            "per_channel": per_channel, "ops": ["MatMul with constant weights"], "weight_matmuls": len(layers),
            "quantized": len(to_quantize),
            "kept_fp32": sorted(kept), "kept_fp32_layers": sorted(label.get(n, n) for n in kept),
            "mask_source_fp32": bool(mask_src)}


def _qdq_params(qdq_proto) -> dict[str, dict]:
    """{MatMul name: activation scale and zero point, dequantized weight} of a QDQ graph."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq_proto.graph.initializer}
    producer = {o: n for n in qdq_proto.graph.node for o in n.output}

    def arr(name):
        return numpy_helper.to_array(inits[name])

    out = {}
    for n in qdq_proto.graph.node:
        if n.op_type != "MatMul":
            continue
        a, b = producer.get(n.input[0]), producer.get(n.input[1])
        if not (a is not None and b is not None and a.op_type == b.op_type == "DequantizeLinear"):
            continue
        axis = next((at.i for at in b.attribute if at.name == "axis"), 1)
        wq, ws, wz = arr(b.input[0]).astype(np.float32), arr(b.input[1]), arr(b.input[2]).astype(np.float32)
        shape = [1] * wq.ndim
        shape[axis] = -1
        out[n.name] = {"scale": float(arr(a.input[1])), "zero_point": float(arr(a.input[2])),
                       "weight": (wq - wz.reshape(shape)) * ws.reshape(shape)}
    return out


def _tapped_batches(path: Path, proto, tensors: list[str], pixels: np.ndarray, batch_size: int):
    """Run the graph ``proto`` (loaded from ``path``, without its external data) on ``pixels`` in
    batches, with the intermediate ``tensors`` as extra outputs; yields {tensor: array} per batch."""
    import copy

    import onnx

    proto = copy.deepcopy(proto)  # the caller's graph keeps its outputs
    have = {o.name for o in proto.graph.output}
    wanted = list(dict.fromkeys(tensors))
    for t in wanted:
        if t not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.taps.", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)  # beside the source: its external data resolves the same
        sess = ort_session(tmp)
        for i in range(0, len(pixels), batch_size):
            yield dict(zip(wanted, sess.run(wanted, {sess.get_inputs()[0].name: pixels[i:i + batch_size]})))
    finally:
        os.unlink(tmp)


#: SmoothQuant's migration strength (Xiao et al., ICML 2023, eq. 4): 0 leaves the activations
#: alone, 1 moves all of their range into the weights.
SMOOTH_ALPHA = 0.5


#: The layers ``--quantize int8-static`` smooths: those after a LayerNorm, where the scales fold in.
#: ``mlp.fc2`` (after GELU) is left out: smoothed, it moved the clusters more on the real ViT-S/14
#: (docs/performance.md, static int8).
SMOOTH_LAYERS = ("attn.qkv", "mlp.fc1")


def smooth_activations(src: str | os.PathLike, dst: str | os.PathLike, calibration: np.ndarray, *,
                       alpha: float = SMOOTH_ALPHA, layers: tuple[str, ...] = SMOOTH_LAYERS,
                       batch_size: int = 8) -> dict:
    """SmoothQuant scale migration on the float32 graph ``src``, written to ``dst``: the same
    function (up to float32 rounding), with activations that per-tensor int8 scales fit better.

    For each weight MatMul ``y = x W`` of the ``layers`` kinds (:func:`weight_matmul_layers` labels)
    the input channel ``j`` is divided by ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` and row
    ``j`` of ``W`` multiplied by it, with ``max|x_j|`` over ``calibration`` (real images). When the
    input comes from a ``LayerNormalization`` or ``SkipLayerNormalization`` read by this MatMul
    only, ``1/s`` is folded into its gamma and beta (no cost); otherwise (``mlp.fc2``, after GELU)
    a ``Mul`` by ``1/s`` is inserted before the MatMul. The MatMul feeding ``ArtifactMask`` is left
    alone. Returns {label: "folded" | "mul"}."""
    import onnx
    from onnx import numpy_helper

    src, dst = Path(src), Path(dst)
    light = onnx.load(str(src), load_external_data=False)  # for the taps: its external data resolves beside src
    external = bool(external_locations(light))
    proto = onnx.load(str(src))
    labels = dict(weight_matmul_layers(proto))
    skip = set(mask_source_matmuls(proto))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    chosen = [n for n in proto.graph.node if n.name in labels and n.name not in skip
              and labels[n.name].split(".", 2)[-1] in layers]
    amax: dict[str, np.ndarray] = {}
    for got in _tapped_batches(src, light, [n.input[0] for n in chosen], calibration, batch_size):
        for n in chosen:
            a = np.abs(got[n.input[0]]).reshape(-1, got[n.input[0]].shape[-1]).max(0)
            amax[n.name] = a if n.name not in amax else np.maximum(amax[n.name], a)
    shared = [n.input[1] for n in chosen if readers.get(n.input[1]) != 1]
    if shared:
        raise InputError(f"smooth_activations: the weight {shared[0]} of {src} is read by more than one node")
    done: dict[str, str] = {}
    for n in chosen:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        s = np.maximum(amax[n.name], 1e-5) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)
        s = np.maximum(s, 1e-5).astype(np.float32)
        p = producer.get(n.input[0])
        ln = p if (p is not None and p.op_type in ("LayerNormalization", "SkipLayerNormalization")
                   and list(p.output).index(n.input[0]) == 0 and readers.get(n.input[0]) == 1) else None
        gamma_beta = [] if ln is None else ([ln.input[1], ln.input[2]] if ln.op_type == "LayerNormalization"
                                            else [ln.input[2], ln.input[3]])
        if ln is not None and all(t in inits and readers.get(t) == 1 for t in gamma_beta):
            for t in gamma_beta:
                inits[t].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[t]) / s, t))
            done[labels[n.name]] = "folded"
        else:
            inv = numpy_helper.from_array((1 / s).astype(np.float32), f"{n.name}.smooth_inv")
            proto.graph.initializer.append(inv)
            out = f"{n.input[0]}.smoothed.{n.name}"
            mul = onnx.helper.make_node("Mul", [n.input[0], inv.name], [out], name=f"{n.name}.smooth")
            proto.graph.node.insert(list(proto.graph.node).index(n), mul)
            n.input[0] = out
            done[labels[n.name]] = "mul"
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], n.input[1]))
    if external:  # as the source: a graph over protobuf's 2 GB keeps its weights beside it
        onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_name(dst.name), size_threshold=1024)
    else:
        onnx.save_model(proto, str(dst))
    return done


def layer_sensitivity(fp32_path: str | os.PathLike, qdq_path: str | os.PathLike, pixels: np.ndarray,
                      batch_size: int = 8) -> list[dict]:
    """Per weight MatMul: the relative error its int8 version adds to its own output, on real images.

    ``qdq_path`` is the fully quantized QDQ graph (its calibrated activation scales and its int8
    weights). The float32 graph runs once on ``pixels`` with each MatMul's input and output as extra
    outputs; each layer's int8 output is then computed from its fp32 input (quantized with the
    graph's scale and zero point, rounded half to even, as QuantizeLinear) and the dequantized int8
    weight, so that a layer's error is its own, not the sum of the layers before it.
    ``rel_err`` = ||y_int8 - y_fp32|| / ||y_fp32||, over all tokens and channels; ``sqnr_db`` is the
    same in dB. Sorted from the most to the least hurt. Not in it: the int16 saturation of the
    u8s8 AVX2 kernels (the end-to-end checks of :func:`plan_static_int8` include it)."""
    import onnx

    fp32_path = Path(fp32_path)
    params = _qdq_params(onnx.load(str(qdq_path)))
    proto = onnx.load(str(fp32_path), load_external_data=False)
    layers = dict(weight_matmul_layers(proto))
    nodes = {n.name: n for n in proto.graph.node if n.name in params}
    extra = []
    for name in nodes:
        extra += [nodes[name].input[0], nodes[name].output[0]]
    err2 = {n: 0.0 for n in nodes}
    ref2 = {n: 0.0 for n in nodes}
    for got in _tapped_batches(fp32_path, proto, extra, pixels, batch_size):
        for name, node in nodes.items():
            p = params[name]
            x, y = got[node.input[0]], got[node.output[0]]
            xq = np.clip(np.rint(x / p["scale"]) + p["zero_point"], 0, 255)
            yq = ((xq - p["zero_point"]) * p["scale"]).astype(np.float32) @ p["weight"]
            err2[name] += float(((yq - y).astype(np.float64) ** 2).sum())
            ref2[name] += float((y.astype(np.float64) ** 2).sum())
    rows = []
    for name in nodes:
        rel = float(np.sqrt(err2[name] / max(ref2[name], 1e-30)))
        rows.append({"node": name, "layer": layers.get(name, name), "rel_err": rel,
                     "sqnr_db": float(-20 * np.log10(max(rel, 1e-12)))})
    return sorted(rows, key=lambda r: -r["rel_err"])


def with_fp32_layers(qdq_proto, fp32_proto, names) -> object:
    """A copy of the QDQ graph ``qdq_proto`` with the MatMuls ``names`` float32 again: each reads its
    float activation (the QuantizeLinear's input) and the float weight of ``fp32_proto``; the Q/DQ
    nodes nobody reads any more are dropped. Same scales as the QDQ graph, so a variant costs a
    rewrite of the graph instead of a quantization run (``quantize_static_int8`` writes the graph
    that is published)."""
    import copy

    q = copy.deepcopy(qdq_proto)
    producer = {o: n for n in q.graph.node for o in n.output}
    fp32_weights = {n.name: n.input[1] for n in fp32_proto.graph.node if n.op_type == "MatMul"}
    fp32_inits = {t.name: t for t in fp32_proto.graph.initializer}
    have = {t.name for t in q.graph.initializer}
    names = set(names)
    for n in q.graph.node:
        if n.op_type != "MatMul" or n.name not in names:
            continue
        dq = producer.get(n.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            qn = producer.get(dq.input[0])
            if qn is not None and qn.op_type == "QuantizeLinear":
                n.input[0] = qn.input[0]
        w = fp32_weights.get(n.name)
        if w is not None and w in fp32_inits:
            if w not in have:
                q.graph.initializer.append(fp32_inits[w])
                have.add(w)
            n.input[1] = w
    outputs = {o.name for o in q.graph.output}
    while True:  # drop the nodes whose outputs nobody reads
        read = {i for n in q.graph.node for i in n.input} | outputs
        dead = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            q.graph.node.remove(n)
    read = {i for n in q.graph.node for i in n.input}
    kept = [t for t in q.graph.initializer if t.name in read]
    del q.graph.initializer[:]
    q.graph.initializer.extend(kept)
    return q


def end_to_end_sensitivity(fp32_path: str | os.PathLike, qdq_path: str | os.PathLike, pixels: np.ndarray,
                           workdir: str | os.PathLike, log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Per weight MatMul, end to end: the fp32 graph with only that layer int8 (the scales and
    weights of the QDQ graph ``qdq_path``), run on real ``pixels`` against the fp32 graph:
    ``damage`` = 1 - mean cosine of the embeddings, and the share of artifact-mask entries that
    flip. This is what the clusters see (a layer's own error, :func:`layer_sensitivity`, is not:
    an early layer's error moves the query norms that ITAE thresholds). Most damaging first."""
    import onnx

    fp32_path, workdir = Path(fp32_path), Path(workdir)
    qdq = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    quantized = [n for n in _qdq_params(qdq)]
    labels = dict(weight_matmul_layers(fp32))
    ref = run_onnx(fp32_path, pixels, batch_size=len(pixels))
    rows = []
    for i, name in enumerate(quantized):
        one = with_fp32_layers(qdq, fp32, [m for m in quantized if m != name])
        path = workdir / "one_layer.onnx"
        onnx.save_model(one, str(path))
        got = run_onnx(path, pixels, batch_size=len(pixels))
        a = l2_normalize(np.asarray(ref[OUTPUT_EMBEDDING], np.float64))
        b = l2_normalize(np.asarray(got[OUTPUT_EMBEDDING], np.float64))
        cos = (a * b).sum(1)
        flips = float((ref[OUTPUT_MASK] != got[OUTPUT_MASK]).mean())
        damage = float(1 - cos.mean()) if np.isfinite(cos).all() else float("inf")
        rows.append({"node": name, "layer": labels.get(name, name), "damage": damage, "min_cosine": float(cos.min()),
                     "mask_flips": flips})
        log(f"  {i + 1}/{len(quantized)} {labels.get(name, name)}: 1 - cos {damage:.2e}, mask flips {flips:.3%}")
    return sorted(rows, key=lambda r: -r["damage"])


#: Neighbours compared by :func:`neighbour_overlap` (an itae-search page shows about this many).
GUARD_NEIGHBOURS = 10


def neighbour_overlap(ref: np.ndarray, got: np.ndarray, n_neighbors: int = GUARD_NEIGHBOURS) -> float:
    """Mean share of each row's ``n_neighbors`` nearest rows (cosine, itself excluded) under ``ref``
    that are also among its nearest under ``got``: what a search user sees change (issue 24)."""
    a, b = l2_normalize(np.asarray(ref, np.float64)), l2_normalize(np.asarray(got, np.float64))
    k = min(n_neighbors, len(a) - 1)
    if k < 1:
        raise InputError(f"neighbour overlap needs at least 2 rows, got {len(a)}")

    def nearest(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k - 1, axis=1)[:, :k]

    na, nb = nearest(a), nearest(b)
    return float(np.mean([len(np.intersect1d(p, q)) / k for p, q in zip(na, nb)]))


def centroid_kept(ref: np.ndarray, got: np.ndarray, k: int, seed: int = 0) -> float:
    """Share of rows whose nearest K-Means centroid (K-Means on ``ref``, L2-normalised) is the same
    for their ``got`` embedding: the images a user's clusters keep."""
    from sklearn.cluster import KMeans

    a, b = l2_normalize(np.asarray(ref, np.float64)), l2_normalize(np.asarray(got, np.float64))
    km = KMeans(k, n_init=10, random_state=seed).fit(a)
    return float((km.predict(a) == km.predict(b)).mean())


def int8_agreement(ref: dict, got: dict, k: int) -> dict:
    """Cosine of the embeddings, artifact-mask agreement and warm-started K-Means ARI of two runs."""
    a = np.asarray(ref[OUTPUT_EMBEDDING], np.float64)
    b = np.asarray(got[OUTPUT_EMBEDDING], np.float64)
    if not np.isfinite(b).all():
        return {"finite": False, "min_cosine": float("nan"), "mean_cosine": float("nan"),
                "mask_agreement": float((ref[OUTPUT_MASK] == got[OUTPUT_MASK]).mean()), "kmeans_ari": None}
    cos = (l2_normalize(a) * l2_normalize(b)).sum(1)
    ari, _ = kmeans_ari(l2_normalize(a), l2_normalize(b), k)
    return {"finite": True, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "mask_agreement": float((ref[OUTPUT_MASK] == got[OUTPUT_MASK]).mean()), "kmeans_ari": ari,
            "neighbour_overlap": neighbour_overlap(a, b), "centroid_kept": centroid_kept(a, b, k)}


def fewest_fp32(n_layers: int, passes: Callable[[int], bool]) -> int:
    """The smallest ``n`` in 0..``n_layers`` for which ``passes(n)`` (the ``n`` most hurt layers kept
    float32) holds, by binary search: assumes that keeping more layers float32 never hurts, and
    takes ``n_layers`` (everything float32) as passing without calling it."""
    if passes(0):
        return 0
    lo, hi = 0, n_layers  # lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def plan_static_int8(fp32_path: str | os.PathLike, workdir: str | os.PathLike, calibration: np.ndarray,
                     selection: np.ndarray, k: int, *, min_ari: float | None = None, margin: float = 0.02,
                     sensitivity_images: int = 8, log: Callable[[str], None] = lambda m: None) -> dict:
    """Which weight MatMuls stay float32 in the static int8 graph, chosen by measurement.

    1. Calibrate on ``calibration`` and quantize every weight MatMul (but the mask source).
    2. :func:`end_to_end_sensitivity` on the first ``sensitivity_images`` of ``selection``: each
       layer int8 alone, ranked by how far it moves the embeddings (and the mask with them).
    3. Keep the ``n`` most damaging layers float32, with the smallest ``n`` (:func:`fewest_fp32`)
       for which the int8 graph agrees with the fp32 graph on all of ``selection`` (real images,
       ``k`` clusters) at K-Means ARI >= ``min_ari + margin``, every embedding finite. The guard
       (:func:`validate_int8`) then runs on other images.
    Returns {"keep_fp32": labels, "sensitivity": rows, "trials": [...], "cache": calibration JSON}."""
    import onnx

    min_ari = INT8_MIN_ARI if min_ari is None else min_ari
    workdir = Path(workdir)
    cache = workdir / "calibration.json"
    full = workdir / "int8_all.onnx"
    log(f"int8 static: calibrating on {len(calibration)} images ...")
    quantize_static_int8(fp32_path, full, calibration, cache=cache)
    n_sens = min(sensitivity_images, len(selection))
    log(f"int8 static: each layer int8 alone, on {n_sens} images ...")
    sens = end_to_end_sensitivity(fp32_path, full, selection[:n_sens], workdir, log=log)
    order = [r["node"] for r in sens]
    labels = {r["node"]: r["layer"] for r in sens}
    qdq, fp32 = onnx.load(str(full)), onnx.load(str(fp32_path))
    ref = run_onnx(fp32_path, selection, batch_size=8)
    trials: dict[int, dict] = {}

    def trial(n: int) -> bool:
        if n not in trials:
            path = workdir / "trial.onnx"
            onnx.save_model(with_fp32_layers(qdq, fp32, order[:n]), str(path))
            agree = int8_agreement(ref, run_onnx(path, selection, batch_size=8), k)
            agree["passed"] = bool(agree["finite"] and agree["kmeans_ari"] >= min_ari + margin)
            trials[n] = {"fp32_layers": n, **agree}
            ari = "n/a" if agree["kmeans_ari"] is None else f"{agree['kmeans_ari']:.4f}"
            log(f"  {n:3d} layers fp32: ARI {ari}, cosine min {agree['min_cosine']:.4f}, "
                f"mask {agree['mask_agreement']:.4%} -> {'ok' if agree['passed'] else 'no'}")
        return trials[n]["passed"]

    n = fewest_fp32(len(order), trial)
    return {"keep_fp32": [labels[m] for m in order[:n]], "sensitivity": sens,
            "trials": [trials[t] for t in sorted(trials)], "cache": str(cache),
            "selection_images": int(len(selection)), "sensitivity_images": n_sens,
            "min_ari_selection": min_ari + margin}


def real_images(images_dir: str | os.PathLike | None, manifest: dict, n: int = 256) -> tuple[np.ndarray, int, str]:
    """(pixels [n, 3, H, W], k, description) of real images for the int8 ARI check.

    ``images_dir``: its images (k = the number of class sub-folders, else 10). Otherwise the
    Fashion-MNIST test split where installed (Debian's dataset-fashion-mnist, or the folder in
    ``$ITAE_FASHION_MNIST``), an even share of each class, k = 10.
    """
    from PIL import Image


    prep = manifest["preprocessing"]
    if images_dir is not None:  # any input of the source layer
        files, where = source_items(images_dir, "--validate-images")
        k = _classes(files)
        step = max(1, len(files) // n)  # every step-th file: calibration_images takes none of these
        _, xs, _ = load_items(files[::step][:n], PreprocessSpec.from_manifest(prep))  # unreadable ones skipped
        if len(xs) < 2 * k:
            raise InputError(f"--validate-images: {where} has {len(xs)} readable images; the int8 check needs "
                             f"at least {2 * k}")
        return np.stack(xs), k, f"{len(xs)} images of {where}"

    if not fashion_mnist.available():
        raise InputError("--quantize int8 checks the clustering on real images: pass --validate-images INPUT "
                         f"(no Fashion-MNIST at {fashion_mnist.ROOT}; set ITAE_FASHION_MNIST)")
    x, y = fashion_mnist.load()
    per_class = max(1, n // 10)
    pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    xs = [preprocess(Image.fromarray(x[i]).convert("RGB"), prep) for i in pick]
    return np.stack(xs), 10, f"{len(xs)} Fashion-MNIST test images ({per_class} per class)"


def calibration_images(images_dir: str | os.PathLike | None, manifest: dict, n: int = 64,
                       part: int = 0) -> tuple[np.ndarray, str]:
    """(pixels [n, 3, H, W], description) for the int8 calibration (``part`` 0) and the layer
    selection (``part`` 1): never the images :func:`real_images` checks the guard on, and the two
    parts never the same images.

    ``images_dir``: the files the guard does not take (it takes every ``step``-th), every
    ``stride``-th of them from phase ``part``; with 256 images or fewer in the folder the guard
    takes them all, and these then overlap the guard's. Otherwise the Fashion-MNIST *train* split,
    an even share of each class, from image ``50 * part`` of each class."""
    from PIL import Image

    prep = manifest["preprocessing"]
    if images_dir is not None:  # any input of the source layer
        files, where = source_items(images_dir, "--validate-images")
        step = max(1, len(files) // 256)
        rest = [f for i, f in enumerate(files) if i % step] if step > 1 else files
        stride = max(2, len(rest) // n)
        _, xs, _ = load_items(rest[part % stride::stride][:n], PreprocessSpec.from_manifest(prep))
        if not xs:
            raise InputError(f"int8 calibration: no readable images in {where} besides the guard's")
        overlap = "" if step > 1 else ", shared with the guard's"
        return np.stack(xs), f"{len(xs)} images of {where}{overlap}"
    if not fashion_mnist.available("train"):
        raise InputError("int8 calibration needs real images: pass --validate-images INPUT "
                         f"(no Fashion-MNIST train split at {fashion_mnist.ROOT}; set ITAE_FASHION_MNIST)")
    x, y = fashion_mnist.load("train")
    per_class, start = max(1, n // 10), 50 * part
    pick = np.concatenate([np.flatnonzero(y == c)[start:start + per_class] for c in range(10)])
    xs = [preprocess(Image.fromarray(x[i]).convert("RGB"), prep) for i in pick]
    return np.stack(xs), f"{len(xs)} Fashion-MNIST train images ({per_class} per class from {start})"


def image_classes(images_dir: str | os.PathLike | None) -> int:
    """k for the ARI checks: the class sub-folders of ``images_dir`` (10 when fewer than 2), 10 for Fashion-MNIST."""
    if images_dir is None:
        return 10
    return _classes(source_items(images_dir, "--validate-images")[0])


def _classes(items) -> int:
    """The number of class folders among ``items`` (10 when fewer than 2)."""
    classes = {item_class(it) for it in items} - {None}
    return len(classes) if len(classes) >= 2 else 10


def read_int8_plan(path: str | os.PathLike) -> dict:
    """A plan JSON of ``--int8-plan``, every field it must have checked (so that a bad plan fails
    before any calibration); InputError in one line naming the file and the field."""
    import json

    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--int8-plan: {path} is not a readable plan ({e})") from None

    def bad(field: str, want: str):
        return InputError(f"--int8-plan: {path}: '{field}' must be {want} (bench/bench_int8_static.py --save-plan)")

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(plan, dict):
        raise InputError(f"--int8-plan: {path}: not a JSON object (bench/bench_int8_static.py --save-plan)")
    if not isinstance(plan.get("keep_fp32"), list) or not all(isinstance(x, str) and x for x in plan["keep_fp32"]):
        raise bad("keep_fp32", "a list of layer labels")
    if not isinstance(plan.get("selection"), str):
        raise bad("selection", "a text")
    if not number(plan.get("min_ari_selection")):
        raise bad("min_ari_selection", "a number")
    if not isinstance(plan.get("trials"), list):
        raise bad("trials", "a list")
    rows = plan.get("sensitivity")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("layer"), str)
                                             and number(r.get("damage")) and number(r.get("mask_flips"))
                                             for r in rows):
        raise bad("sensitivity", "a list of {layer, damage, mask_flips}")
    return plan


def quantize_graph(kind: str, fp32_path: str | os.PathLike, dst: str | os.PathLike, manifest: dict, *,
                   workdir: str | os.PathLike, images_dir=None, per_channel: bool = True,
                   plan: str | os.PathLike | None = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """``--quantize int8`` (dynamic, :func:`quantize_int8`) or ``int8-static`` (QDQ calibrated on real
    images, the layers that hurt the clusters kept float32 by :func:`plan_static_int8`) of the
    validated fp32 graph; returns the manifest's ``quantization`` (without the guard's validation).

    ``plan``: a plan JSON written by ``bench/bench_int8_static.py --save-plan`` for this model:
    the layers it names (``blocks.<i>.<layer>`` labels, the same whatever fusions ``--optimize``
    chose) stay float32 and the search is skipped; the calibration runs again on this graph. The
    guard still runs."""
    if kind == "int8":
        return quantize_int8(fp32_path, dst, per_channel=per_channel)
    if kind != "int8-static":
        raise InputError(f"--quantize: {kind!r} is not one of int8, int8-static")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cal, cal_what = calibration_images(images_dir, manifest, 64, part=0)
    # SmoothQuant first: the same function in float32, activations that per-tensor scales fit
    smoothed = workdir / "smoothed.onnx"
    log(f"int8 static: SmoothQuant (alpha {SMOOTH_ALPHA}) of {', '.join(SMOOTH_LAYERS)} on {len(cal)} images ...")
    smoothing = smooth_activations(fp32_path, smoothed, cal)
    if plan is not None:
        path = Path(plan)
        plan = read_int8_plan(path)
        sel_what = plan["selection"] + f" (plan {path.name})"
        log(f"int8 static: the plan {path} ({len(plan['keep_fp32'])} layers float32); calibrating ...")
        plan["cache"] = str(workdir / "calibration.json")
        quantize_static_int8(smoothed, workdir / "int8_all.onnx", cal, cache=plan["cache"])
    else:
        sel, sel_what = calibration_images(images_dir, manifest, 120, part=1)
        plan = plan_static_int8(smoothed, workdir, cal, sel, image_classes(images_dir), log=log)
    everything = bool(plan["sensitivity"]) and len(plan["keep_fp32"]) >= len(plan["sensitivity"])
    info = None if everything else quantize_static_int8(smoothed, dst, None, cache=plan["cache"],
                                                         keep_fp32=plan["keep_fp32"], per_channel=per_channel)
    if info is not None:
        info["smoothing"] = {"method": "SmoothQuant scale migration (Xiao et al. 2023), folded into the LayerNorms",
                             "alpha": SMOOTH_ALPHA, "layers": smoothing}
    if info is None or not info["quantized"]:
        Path(dst).unlink(missing_ok=True)
        raise ToleranceError("int8 validation failed: no weight MatMul can be int8 without moving the K-Means "
                             f"assignments of {sel_what} below ARI {plan['min_ari_selection']:.2f}; nothing was "
                             "written. The float32 graph passed: export it without --quantize",
                             {"passed": False, "trials": plan["trials"]})
    cpu = hardware.read_cpu()
    info.update(calibration=cal_what, selection=sel_what, selection_min_ari=plan["min_ari_selection"],
                sensitivity=[{k: r[k] for k in ("layer", "damage", "mask_flips")} for r in plan["sensitivity"]],
                trials=plan["trials"], measured_on={"cpu_kind": hardware.cpu_kind(cpu), "cpu": cpu.model})
    return info


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
    ari = ari_independent = overlap = kept = None
    if finite:  # the guard's ARI is the warm-started one (see kmeans_ari)
        r = len(x_val)
        ari, ari_independent = kmeans_ari(l2_normalize(a[r:]), l2_normalize(b[r:]), k)
        overlap, kept = neighbour_overlap(a[r:], b[r:]), centroid_kept(a[r:], b[r:], k)
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
        # what a user loses, on the real images (recorded, not yet a threshold: see docs/performance.md)
        "neighbour_overlap": overlap, "neighbour_overlap_k": GUARD_NEIGHBOURS, "centroid_kept": kept,
        "mean_cosine_real": float(np.mean(cos[len(x_val):])) if finite else None,
        "passed": failure is None, "failure": failure,
    }
    log(format_int8_report(report))
    return report


def format_int8_report(r: dict) -> str:
    verdict = "PASSED" if r["passed"] else f"FAILED ({r['failure']})"
    ari = "n/a" if r["kmeans_ari"] is None else f"{r['kmeans_ari']:.4f}"
    return (f"int8 validation {verdict}: {r['n_inputs']} inputs ({r['real_images']}), cosine to fp32 min "
            f"{r['min_cosine']:.5f} mean {r['mean_cosine']:.5f}, artifact-mask agreement {r['mask_agreement']:.4%}, "
            f"K-Means ARI fp32 vs int8 {ari} (k={r['k']}, needs >= {r['min_ari']})"
            + (f"; {r['neighbour_overlap']:.1%} of the {r['neighbour_overlap_k']} nearest neighbours kept, "
               f"{r['centroid_kept']:.1%} of the images keep their fp32 centroid"
               if r.get("neighbour_overlap") is not None else ""))
