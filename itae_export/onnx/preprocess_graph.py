"""The in-graph preprocessing variant: decoded uint8 images in, embeddings out.

:func:`export_in_graph` takes an exported, validated encoder (``pixel_values`` float32
``[batch, 3, H, W]``) and writes ``<stem>_image.onnx`` whose input is ``image``, uint8
``[batch, height, width, 3]`` (RGB, any height and width, one size per batch). The resize and
the normalisation are ONNX ops in front of the encoder, so every runtime computes the same
pixels:

1. ``Resize`` (opset 18) on the uint8 NHWC tensor, ``axes=[1, 2]``, ``sizes=[H, W]``,
   ``mode="cubic"``, ``cubic_coeff_a=-0.5``, ``antialias=1``, ``exclude_outside=1``,
   ``coordinate_transformation_mode="half_pixel"`` (``mode="linear"`` for a bilinear manifest).
   This is Pillow's BICUBIC filter (support widened by the downscale factor, weights
   normalised inside the image, width pass then height pass, uint8 rounding after each). ONNX
   Runtime's CPU kernel (also the one of onnxruntime-node and of onnxruntime-web's WASM build)
   computes the filter weights in float32 where Pillow uses float64, so a few values per image
   differ from Pillow by one level (docs/onnx-contract.md gives the measured gap).
2. ``Transpose`` to NCHW, ``Cast`` to float32, ``Mul`` by ``scale``, ``Sub`` ``mean``,
   ``Div`` ``std``: the same float32 operations as :func:`itae_export.images.preprocess`.

Validation (like every export): the composed graph in ONNX Runtime against the PyTorch model fed
:func:`reference_resize` (the same resize in PyTorch, integer arithmetic reproduced exactly),
on real photos and odd-sized random images, one image at a time and batched; the preprocessing
subgraph alone must give bit-identical ``pixel_values``. The report also gives the pixel gap to
the Pillow path of ``itae-cluster``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from itae_export.errors import CheckpointError, InputError, ToleranceError
from itae_export.data.embed import source_items
from itae_export.images import (
    ImageDecodeError,
    PreprocessSpec,
    pil_resize,
    to_rgb,
)
from itae_export.onnx.contract import (
    IMAGE_INPUT_NAME,
    IN_GRAPH_SUFFIX,
    INPUT_NAME,
    OUTPUT_EMBEDDING,
    OUTPUT_MASK,
    external_data_name,
)
from itae_export.onnx.export import ExportResult, spec_from_manifest, staging_folder
from itae_export.onnx.manifest import external_locations, graph_tensors, manifest_path, read_manifest, seal_with_weights, write_manifest
from itae_export.onnx.validate import format_report, item_name, judge, reference_for, sample_photos
from itae_export.registry import ITAEOptions
from itae_export.runtime import ort_session
from itae_export.weights import checkpoints

CUBIC_COEFF_A = -0.5  # Pillow's BICUBIC (ONNX's default is -0.75)
_MODES = {"bicubic": "cubic", "bilinear": "linear"}
_PRECISION_BITS = 22  # Pillow's and ONNX Runtime's fixed point for 8-bit resampling


def in_graph_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model_image.onnx``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + IN_GRAPH_SUFFIX + p.suffix)


def resize_attributes(pre: PreprocessSpec) -> dict:
    """The attributes of the ONNX Resize node (also written to the manifest)."""
    if pre.interpolation not in _MODES:
        raise InputError(f"in-graph preprocessing: interpolation {pre.interpolation!r} has no ONNX Resize "
                         f"equivalent of Pillow's (only {', '.join(_MODES)})")
    attrs = {"mode": _MODES[pre.interpolation], "antialias": 1, "exclude_outside": 1,
             "coordinate_transformation_mode": "half_pixel", "axes": [1, 2]}
    if attrs["mode"] == "cubic":
        attrs["cubic_coeff_a"] = CUBIC_COEFF_A
    return attrs


def build_preprocess_graph(pre: PreprocessSpec, ir_version: int = 8):
    """The preprocessing as an ONNX model: ``image`` uint8 [batch, height, width, 3] ->
    ``pixel_values`` float32 [batch, 3, H, W]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    attrs = resize_attributes(pre)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.array([pre.height, pre.width], np.int64), "pre_sizes"),
        numpy_helper.from_array(np.array(pre.scale, f32), "pre_scale"),
        numpy_helper.from_array(np.asarray(pre.mean, f32).reshape(1, 3, 1, 1), "pre_mean"),
        numpy_helper.from_array(np.asarray(pre.std, f32).reshape(1, 3, 1, 1), "pre_std"),
    ]
    nodes = [
        helper.make_node("Resize", [IMAGE_INPUT_NAME, "", "", "pre_sizes"], ["pre_resized"], name="pre_resize", **attrs),
        helper.make_node("Transpose", ["pre_resized"], ["pre_nchw"], perm=[0, 3, 1, 2], name="pre_nchw"),
        helper.make_node("Cast", ["pre_nchw"], ["pre_float"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Mul", ["pre_float", "pre_scale"], ["pre_scaled"], name="pre_scale"),
        helper.make_node("Sub", ["pre_scaled", "pre_mean"], ["pre_centred"], name="pre_sub_mean"),
        helper.make_node("Div", ["pre_centred", "pre_std"], [INPUT_NAME], name="pre_div_std"),
    ]
    graph = helper.make_graph(
        nodes, "itae_preprocess",
        [helper.make_tensor_value_info(IMAGE_INPUT_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, pre.height, pre.width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------ the same resize in PyTorch


def _filter(x: np.ndarray, mode: str) -> np.ndarray:
    f32 = np.float32
    x = np.abs(x).astype(f32)
    out = np.zeros_like(x)
    if mode == "linear":
        m = x < 1
        out[m] = f32(1) - x[m]
        return out
    a = f32(CUBIC_COEFF_A)
    m1, m2 = x < 1, (x >= 1) & (x < 2)
    out[m1] = ((a + f32(2)) * x[m1] - (a + f32(3))) * x[m1] * x[m1] + f32(1)
    out[m2] = (((x[m2] - f32(5)) * x[m2] + f32(8)) * x[m2] - f32(4)) * a
    return out


def resize_weights(in_size: int, out_size: int, mode: str = "cubic") -> np.ndarray:
    """int64 [out_size, in_size]: the fixed-point (2^22) filter weights of ONNX Resize with
    antialias and exclude_outside, computed in float32 in the order ONNX Runtime's CPU kernel
    uses (``upsample_antialias.h``), rounded half away from zero."""
    f32 = np.float32
    support_size = f32(4.0 if mode == "cubic" else 2.0)
    rscale = f32(out_size) / f32(in_size)
    scale = f32(1) / rscale
    support = support_size * f32(0.5) * scale if scale >= 1 else support_size * f32(0.5)
    window = int(np.ceil(support)) * 2 + 1
    inv_scale = f32(1) / scale if scale >= 1 else f32(1)
    weights = np.zeros((out_size, in_size), np.int64)
    for i in range(out_size):
        if scale == 1:
            center = f32(0.5) + f32(i)
        else:  # half_pixel: (i + 0.5) / rscale - 0.5, then + 0.5
            center = f32(0.5) + ((f32(i) + f32(0.5)) / rscale - f32(0.5))
        lo = int(np.floor(center - support + f32(0.5)))
        hi = int(np.floor(center + support + f32(0.5)))
        hi = lo + min(max(hi - lo, 0), window)
        lo, hi = min(max(lo, 0), in_size), min(max(hi, 0), in_size)
        w = _filter((np.arange(lo, hi).astype(f32) - center + f32(0.5)) * inv_scale, mode)
        total = f32(0)
        for v in w:  # sequential float32 sum, as the kernel does
            total = f32(total + v)
        inv_total = f32(1) / total if total != 0 else f32(1)
        scaled = (w * inv_total).astype(f32) * f32(1 << _PRECISION_BITS)
        weights[i, lo:hi] = np.trunc(scaled + np.copysign(f32(0.5), scaled)).astype(np.int64)
    return weights


def reference_resize(image: np.ndarray, height: int, width: int, mode: str = "cubic") -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3] in PyTorch: the width pass, then the height
    pass, each ``clip((sum(w_q * x) + 2^21) >> 22, 0, 255)`` with the weights of
    :func:`resize_weights`. float64 matmuls are exact here (every partial sum < 2^53)."""
    import torch

    x = torch.tensor(np.asarray(image), dtype=torch.float64).permute(2, 0, 1)  # [3, h, w]
    half, one = float(1 << (_PRECISION_BITS - 1)), float(1 << _PRECISION_BITS)
    if x.shape[2] != width:
        wx = torch.from_numpy(resize_weights(x.shape[2], width, mode).astype(np.float64))
        x = torch.floor((x @ wx.T + half) / one).clamp_(0, 255)
    if x.shape[1] != height:
        wy = torch.from_numpy(resize_weights(x.shape[1], height, mode).astype(np.float64))
        x = torch.floor((wy @ x + half) / one).clamp_(0, 255)
    return x.permute(1, 2, 0).to(torch.uint8).numpy()


def reference_pixels(images: list[np.ndarray], pre: PreprocessSpec) -> np.ndarray:
    """float32 [n, 3, H, W]: :func:`reference_resize`, then the float32 normalisation, in PyTorch."""
    import torch

    mode = _MODES[pre.interpolation]
    out = []
    for im in images:
        r = torch.from_numpy(reference_resize(im, pre.height, pre.width, mode)).permute(2, 0, 1).to(torch.float32)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
        out.append(((r * torch.tensor(pre.scale, dtype=torch.float32) - mean) / std).numpy())
    return np.stack(out)


# ------------------------------------------------------------------ composition


def compose(encoder_path: str | os.PathLike, output: str | os.PathLike, pre: PreprocessSpec) -> str | None:
    """Write the preprocessing graph composed in front of the encoder at ``output``: its nodes and
    initializers go first, its output ``pixel_values`` feeds the encoder, its input ``image``
    becomes the graph's input (what ``onnx.compose.merge_models`` does, done on the protos so that
    weights kept as external data are never loaded). Those are copied to ``<output name>.data``;
    returns that file name or None. The result passes ``onnx.checker`` (by path)."""
    import onnx

    encoder_path, output = Path(encoder_path), Path(output)
    enc = onnx.load(str(encoder_path), load_external_data=False)
    inputs = [i.name for i in enc.graph.input]
    if inputs != [INPUT_NAME]:
        raise InputError(f"{encoder_path}: expected the single input {INPUT_NAME!r}, found {inputs}")
    pre_model = build_preprocess_graph(pre, ir_version=enc.ir_version)
    taken = {n for node in enc.graph.node for n in (*node.input, *node.output)} | {t.name for t in enc.graph.initializer}
    clash = taken & ({n for node in pre_model.graph.node for n in node.output} - {INPUT_NAME}
                     | {t.name for t in pre_model.graph.initializer})
    if clash:
        raise InputError(f"{encoder_path}: names {sorted(clash)} clash with the preprocessing graph")
    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in enc.opset_import):
        raise InputError(f"{encoder_path}: the encoder's opset is below 18 (Resize with antialias needs 18)")
    g = enc.graph
    nodes = list(pre_model.graph.node) + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(pre_model.graph.initializer)
    del g.input[:]
    g.input.extend(pre_model.graph.input)
    location = None
    old = external_locations(enc)
    if old:
        if len(old) != 1:
            raise InputError(f"{encoder_path}: weights in several external files ({old}) are not supported")
        location = external_data_name(output.name)
        shutil.copyfile(encoder_path.parent / old[0], output.parent / location)
        for t in graph_tensors(enc):
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    onnx.save_model(enc, str(output))
    onnx.checker.check_model(str(output))
    return location


# ------------------------------------------------------------------ validation


def validation_images(seed: int = 0, images_dir: str | os.PathLike | None = None
                      ) -> tuple[list[np.ndarray], list[str], list[list[int]]]:
    """(uint8 [h, w, 3] images, names, batches of indices with one size each): the bundled photos
    at their own sizes, the images of ``images_dir`` (decoded as itae-cluster does), and random
    images of odd sizes (downscaled, upscaled, one axis only)."""
    rng = np.random.default_rng(seed)
    images, names = [], []
    for name, img in sample_photos():
        images.append(np.asarray(to_rgb(img)))
        names.append(name)
    if images_dir is not None:  # any input of the source layer
        for item in source_items(images_dir, "--validate-images")[0]:
            try:
                images.append(np.asarray(item.decode()[0]))
                names.append(item_name(item))
            except ImageDecodeError:
                continue
    for h, w in ((97, 61), (300, 224), (41, 500), (224, 224), (1, 1)):
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        names.append(f"random:{h}x{w}")
    first = images[0]  # a batch of three crops of one size
    crops = [first[i * 10 : i * 10 + 200, i * 7 : i * 7 + 300].copy() for i in range(3)]
    batch = list(range(len(images), len(images) + 3))
    images += crops
    names += [f"{names[0]}:crop{i}" for i in range(3)]
    singles = [[i] for i in range(len(images) - 3)]
    return images, names, singles + [batch]


def pil_gap(images: list[np.ndarray], pre: PreprocessSpec) -> dict:
    """How far the in-graph resize is from the Pillow path (``itae_export.images.preprocess``),
    in 8-bit levels, over ``images``."""
    from PIL import Image

    mode = _MODES[pre.interpolation]
    diff_values = total = max_diff = 0
    for im in images:
        ours = reference_resize(im, pre.height, pre.width, mode).astype(np.int16)
        theirs = np.asarray(pil_resize(Image.fromarray(im), pre), dtype=np.int16)
        d = np.abs(ours - theirs)
        diff_values += int((d > 0).sum())
        total += d.size
        max_diff = max(max_diff, int(d.max()))
    return {"values_differing": diff_values, "values": total, "share": diff_values / max(total, 1),
            "max_levels": max_diff}


def validate_in_graph(path: str | os.PathLike, model, manifest: dict, *, images_dir=None,
                      log: Callable[[str], None] = lambda m: None) -> dict:
    """The composed graph in ONNX Runtime against PyTorch fed :func:`reference_pixels`."""
    pre = PreprocessSpec.from_manifest(manifest["preprocessing"])
    images, names, batches = validation_images(images_dir=images_dir)
    x = reference_pixels(images, pre)
    ref = reference_for(model, x, names)  # judged like every export: against float64 PyTorch
    sess = ort_session(path)
    outs = [OUTPUT_EMBEDDING, OUTPUT_MASK]
    embs, masks = np.zeros_like(ref.emb32), np.zeros_like(ref.mask64)
    for b in batches:
        e, m = sess.run(outs, {IMAGE_INPUT_NAME: np.stack([images[i] for i in b])})
        embs[b], masks[b] = e, m
    report = judge(ref, embs, masks, manifest, model)
    # the preprocessing subgraph alone: bit-identical pixel_values
    pre_sess = ort_session(build_preprocess_graph(pre))
    mismatch = 0
    for b in batches:
        (got,) = pre_sess.run(None, {IMAGE_INPUT_NAME: np.stack([images[i] for i in b])})
        mismatch += int((got != x[b]).sum())
    report["pixel_mismatch"] = mismatch
    if report["passed"] and mismatch:
        report["passed"] = False
        report["failure"] = f"{mismatch} pixel values of the in-graph preprocessing differ from the PyTorch resize"
    report["inputs"] = names
    report["batches"] = [len(b) for b in batches]
    report["pil_gap"] = pil_gap(images, pre)
    log(format_report(report) + f", pixel values differing {mismatch}")
    return report


def _torch_model(manifest: dict, weights: str | None):
    """The PyTorch ITAE model an exported graph came from (as itae-validate rebuilds it)."""
    spec = spec_from_manifest(manifest)
    fields = {f.name for f in dataclasses.fields(ITAEOptions)}
    options = ITAEOptions(**{k: v for k, v in manifest["itae"].items() if k in fields})
    recorded = manifest.get("weights", {})
    source = weights or recorded.get("source")
    if not source or not Path(source).exists():
        raise CheckpointError(f"the weights the encoder was exported from ({recorded.get('source') or 'unknown'}) "
                              "are not on this machine; pass --weights PATH to validate the in-graph variant")
    model, _ = checkpoints.load_model(spec, options, weights=source, pos_rule=manifest.get("pos_rule"))
    model.fix_resolution(manifest["preprocessing"]["resolution"][0])
    return model.float().eval()


def in_graph_manifest(manifest: dict) -> dict:
    """The encoder's manifest with the image input and a description of the in-graph steps."""
    m = copy.deepcopy(manifest)
    pre = PreprocessSpec.from_manifest(manifest["preprocessing"])
    m["inputs"] = [{"name": IMAGE_INPUT_NAME, "dtype": "uint8", "shape": ["batch", "height", "width", 3]}]
    m["preprocessing_in_graph"] = {
        "input": IMAGE_INPUT_NAME, "layout": "NHWC", "dtype": "uint8", "channel_order": "RGB",
        "resize": {"op": "Resize", "opset": 18, "sizes": [pre.height, pre.width], **resize_attributes(pre)},
        "normalisation": "float32: (x * scale - mean) / std",
        "encoder_input": INPUT_NAME,
    }
    m.pop("inline_copy", None)
    return m


def _set_manifest_metadata(path: Path, manifest: dict) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    seal_with_weights(proto, manifest, path.parent)
    onnx.save_model(proto, str(path))


def export_in_graph(onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, *, model=None,
                    weights: str | None = None, validate: bool = True,
                    log: Callable[[str], None] = lambda m: None) -> ExportResult:
    """Write ``<stem>_image.onnx`` (+ manifest) from an exported encoder: the preprocessing of its
    manifest as ONNX ops in front of it. ``model``: the PyTorch ITAE model the encoder came from
    (else rebuilt from the manifest's weights, or ``weights``). Nothing is written at ``output``
    unless the validation passes (or ``validate=False``)."""
    onnx_path = Path(onnx_path)
    manifest = read_manifest(onnx_path, verify=True)  # build only on a graph that is what it was exported as
    if "quantization" in manifest:
        raise InputError(f"{onnx_path}: in-graph preprocessing starts from a float graph, not an int8 one")
    if manifest.get("inputs", [{}])[0].get("name") != INPUT_NAME:
        raise InputError(f"{onnx_path}: not an encoder with the input {INPUT_NAME!r} (already in-graph?)")
    output = Path(output) if output else in_graph_path(onnx_path)
    if output.suffix != ".onnx":
        raise InputError(f"{output}: the in-graph variant's path must end with .onnx")
    new_manifest = in_graph_manifest(manifest)
    if validate and model is None:
        log("rebuilding the PyTorch model for the validation ...")
        model = _torch_model(manifest, weights)
    with staging_folder(output, log) as tmpdir:  # the same staging as every export
        tmp = tmpdir / output.name
        log(f"composing the preprocessing graph in front of {onnx_path.name} ...")
        location = compose(onnx_path, tmp, PreprocessSpec.from_manifest(manifest["preprocessing"]))
        new_manifest["external_data"] = location
        if validate:
            log("validating the in-graph variant against PyTorch with the same resize ...")
            report = validate_in_graph(tmp, model, new_manifest, log=log)
            if not report["passed"]:
                raise ToleranceError(f"in-graph preprocessing validation failed: {report['failure']}", report)
            new_manifest["validation"] = report
        else:
            new_manifest["validation"] = {"skipped": True}
        _set_manifest_metadata(tmp, new_manifest)
        stale = manifest_path(output)
        if stale.exists():
            stale.unlink()
        if location:
            os.replace(tmpdir / location, output.parent / location)
        os.replace(tmp, output)
        write_manifest(output, new_manifest)
    return ExportResult(output, new_manifest)


def is_in_graph(onnx_path: str | os.PathLike) -> bool:
    """Whether an exported graph is the in-graph preprocessing variant (manifest ``inputs``)."""
    return read_manifest(onnx_path).get("inputs", [{}])[0].get("name") == IMAGE_INPUT_NAME


def revalidate_in_graph(onnx_path: str | os.PathLike, *, weights: str | None = None, images_dir=None,
                        log: Callable[[str], None] = lambda m: None) -> dict:
    """itae-validate for the in-graph variant: rebuild the PyTorch model and compare again."""
    manifest = read_manifest(onnx_path)
    return validate_in_graph(onnx_path, _torch_model(manifest, weights), manifest, images_dir=images_dir, log=log)
