"""Export an ITAE-patched encoder to ONNX: custom-domain nodes, local functions, a manifest,
and a validation against PyTorch before anything lands at the output path."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from itae_export import __version__
from itae_export.errors import CheckpointError, InputError, ToleranceError
from itae_export.model.itae import inject_itae
from itae_export.onnx.contract import (
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAME,
    ITAE_DOMAIN,
    ITAE_DOMAIN_VERSION,
    MANIFEST_SCHEMA,
    MAX_BATCH,
    METADATA_KEY,
    ONNX_OPSET,
    OUTPUT_CLS_ATTENTION,
    OUTPUT_EMBEDDING,
    OUTPUT_MASK,
    PRECISIONS,
    QUANTIZATIONS,
    external_data_name,
)
from itae_export.onnx.functions import attach_functions, translation_table
from itae_export.onnx.manifest import manifest_path, read_manifest, write_manifest
from itae_export.onnx.optimize import choose_fusions, fold_layerscale_, quantize_graph, validate_int8
from itae_export.onnx.validate import torch_reference, validate_model
from itae_export.registry import ArchConfig, ITAEOptions, ModelSpec, Preprocessing, get_model_spec
from itae_export.weights import checkpoints


@dataclasses.dataclass
class ExportResult:
    path: Path
    manifest: dict
    inline_path: Path | None = None

    @property
    def validation(self) -> dict:
        return self.manifest.get("validation", {})


def export_dir() -> Path:
    return Path(os.environ.get("ITAE_EXPORT_DIR", "exported"))


def default_output_path(spec: ModelSpec | str, options: ITAEOptions, resolution: int | None = None,
                        precision: str = "fp32", quantize: str | None = None) -> Path:
    """``exported/<model>_<res>_<itae options>[_fp16][_int8].onnx``."""
    spec = get_model_spec(spec) if isinstance(spec, str) else spec
    res = resolution or spec.preprocessing.resolution
    name = f"{spec.name}_{res}_{options.slug()}"
    if precision != "fp32":
        name += f"_{precision}"
    if quantize:
        name += f"_{quantize}"
    return export_dir() / f"{name}.onnx"


class _ExportWrapper:
    """Builds the torch module whose outputs are the contract's outputs (lazy torch import)."""

    @staticmethod
    def make(model, attention_output: bool, half: bool):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                x = pixel_values.half() if half else pixel_values
                f = self.model.forward_features(x, cls_only=True)  # the outputs need only the CLS row
                outs = (f["embedding"].float(), f["artifact_mask"])
                if attention_output:
                    outs = outs + (f["cls_attention"].float(),)
                return outs

        return Wrapper().eval()


def output_names(attention_output: bool) -> list[str]:
    names = [OUTPUT_EMBEDDING, OUTPUT_MASK]
    if attention_output:
        names.append(OUTPUT_CLS_ATTENTION)
    return names


def _torch_export(model, resolution: int, attention_output: bool, half: bool, path: Path, external: bool):
    """torch.export -> ONNX at ``path`` with ``itae`` nodes; returns (graph proto without weights
    loaded when external, external data file name or None). Saved through the IR so that models
    over protobuf's 2 GiB limit (ViT-g/14) never become one in-memory proto."""
    import onnx
    import onnx_ir
    import torch


    wrapper = _ExportWrapper.make(model, attention_output, half)
    example = torch.randn(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    quiet_logger = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ..."
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter narrates every step and warns about its own internals
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=output_names(attention_output),
                dynamic_shapes=({0: batch},),
                custom_translation_table=translation_table(),
                verbose=False,
            )
    finally:
        quiet_logger.setLevel(level)
    location = external_data_name(path.name) if external else None
    onnx_ir.save(program.model, str(path), external_data=location, size_threshold_bytes=1024)
    proto = onnx.load(str(path), load_external_data=False)
    attach_functions(proto)
    return proto, location


def _set_metadata(proto, manifest: dict) -> None:
    del proto.metadata_props[:]
    for node in proto.graph.node:  # the exporter's per-node stack traces: build paths, most of the graph's bytes
        del node.metadata_props[:]
    flat = {
        METADATA_KEY: json.dumps(manifest, sort_keys=True),
        "itae.model": manifest["model"],
        "itae.theta": str(manifest["itae"]["theta"]),
        "itae.enabled": str(manifest["itae"]["enabled"]).lower(),
        "itae.preprocessing": json.dumps(manifest["preprocessing"], sort_keys=True),
    }
    for k, v in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"{manifest['model']} with ITAE ({json.dumps(manifest['itae'])}); exported by itae-export"
    proto.producer_name = "itae-export"
    proto.producer_version = manifest["package_version"]


def _save(proto, path: Path, external: bool) -> str | None:
    import onnx

    if external:
        location = external_data_name(path.name)
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        return location
    onnx.save_model(proto, str(path))
    return None


def _weights_nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_manifest(spec: ModelSpec, options: ITAEOptions, *, resolution: int, precision: str,
                   attention_output: bool, pos_rule: str, weights_info: dict, num_tokens: int) -> dict:
    import onnx
    import onnxruntime
    import torch


    prep = spec.preprocessing.to_dict()
    prep["resolution"] = [resolution, resolution]
    a = spec.arch
    outputs = [
        {"name": OUTPUT_EMBEDDING, "dtype": "float32", "shape": ["batch", spec.embed_dim]},
        {"name": OUTPUT_MASK, "dtype": "bool", "shape": ["batch", num_tokens - 1]},
    ]
    if attention_output:
        outputs.append({"name": OUTPUT_CLS_ATTENTION, "dtype": "float32", "shape": ["batch", a.num_heads, num_tokens]})
    itae = options.to_dict()
    itae.update(group_code=options.group_code, strategy_code=options.strategy_code)
    return {
        "schema": MANIFEST_SCHEMA,
        "model": spec.name,
        "family": spec.family,
        "arch": dataclasses.asdict(a),
        "embed_dim": spec.embed_dim,
        "num_heads": a.num_heads,
        "num_tokens": num_tokens,
        "num_register_tokens": a.num_register_tokens,
        "itae": itae,
        "preprocessing": prep,
        "pos_rule": pos_rule,
        "precision": precision,
        "opset": ONNX_OPSET,
        "custom_domain": {"name": ITAE_DOMAIN, "version": ITAE_DOMAIN_VERSION},
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, resolution, resolution]}],
        "outputs": outputs,
        "weights": weights_info,
        "package": "itae-export",
        "package_version": __version__,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def export_onnx(
    spec_or_name: ModelSpec | str,
    options: ITAEOptions | None = None,
    output: str | os.PathLike | None = None,
    *,
    weights: str | None = None,
    model=None,
    weights_info: dict | None = None,
    pos_rule: str | None = None,
    resolution: int | None = None,
    precision: str = "fp32",
    attention_output: bool = False,
    inline: bool = False,
    validate: bool = True,
    validate_images: str | os.PathLike | None = None,
    external_data: bool | None = None,
    optimize: bool = False,
    quantize: str | None = None,
    quantize_per_channel: bool = True,
    int8_images: int = 256,
    int8_plan: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda msg: None,
    _tamper: Callable | None = None,
) -> ExportResult:
    """Export ``spec_or_name`` with ITAE ``options`` to ``output`` (default: under exported/).

    ``model`` lets callers pass an already-built VisionTransformer (tests, tiny specs);
    otherwise the weights come from ``weights`` or the official source. Nothing is written
    at ``output`` unless validation passes (or ``validate=False``).
    ``optimize``: LayerScale folded and ORT fusions (:mod:`itae_export.onnx.optimize`), validated before
    and after the fusions. ``quantize="int8"``: dynamic int8 MatMuls, validated against the fp32
    graph (cosine, mask agreement, K-Means ARI on real images; needs ``validate``).
    """
    import onnx
    import torch

    spec = get_model_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    options = options or ITAEOptions.for_model(spec)
    if precision not in PRECISIONS:
        raise InputError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if quantize not in (None, *QUANTIZATIONS):
        raise InputError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize and (precision != "fp32" or not validate):
        raise InputError("--quantize int8 starts from the validated fp32 graph: use --precision fp32 and --validate")
    resolution = resolution or spec.preprocessing.resolution
    p = spec.arch.patch_size
    if resolution <= 0 or resolution % p:
        raise InputError(f"--resolution: {resolution} is not a positive multiple of the patch size {p}")
    output = Path(output) if output else default_output_path(spec, options, resolution, precision, quantize)
    if output.suffix != ".onnx":
        raise InputError(f"--output: {output} must end with .onnx")

    if model is None:
        log(f"loading weights for {spec.name} ...")
        model, loaded = checkpoints.load_model(spec, options, weights=weights, pos_rule=pos_rule)
        weights_info = loaded.info()
        pos_rule = loaded.pos_rule
    else:
        inject_itae(model, options)
        if pos_rule:
            model.pos_rule = pos_rule
        weights_info = weights_info or {"source": "in-memory model", "format": "torch", "sha256": None}
    model = model.float().eval()
    spec = dataclasses.replace(spec, arch=model.cfg)  # a checkpoint may carry its own position grid
    model.fix_resolution(resolution)
    num_tokens = 1 + spec.arch.num_register_tokens + (resolution // p) ** 2

    half = precision == "fp16"
    log(f"exporting {spec.name} at {resolution}x{resolution} ({precision}, {options.slug()}) ...")
    export_model = model
    if half or optimize:
        import copy

        export_model = copy.deepcopy(model)
        if optimize:
            folded = fold_layerscale_(export_model)
        if half:
            export_model = export_model.half()
        export_model.fix_resolution(resolution)
    manifest = build_manifest(spec, options, resolution=resolution, precision=precision,
                              attention_output=attention_output, pos_rule=model.pos_rule,
                              weights_info=weights_info, num_tokens=num_tokens)
    external = external_data if external_data is not None else _weights_nbytes(export_model) > EXTERNAL_DATA_THRESHOLD
    output.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.stem}.", suffix=".tmp"))
    try:
        tmp_path = tmpdir / output.name
        with torch.no_grad():
            proto, location = _torch_export(export_model, resolution, attention_output, half, tmp_path, external)
        if _tamper is not None:  # tests force a mismatch through here
            _tamper(proto)
        manifest["external_data"] = location
        _set_metadata(proto, manifest)
        onnx.save_model(proto, str(tmp_path))
        if validate:
            steps = {}
            reference = torch_reference(model, manifest, validate_images)  # the same before and after fusing
            if optimize:
                log("validating the exported graph (LayerScale folded) against PyTorch ...")
                steps["exported"] = _validated(validate_model(tmp_path, model, manifest, images_dir=validate_images,
                                                              reference=reference, log=log))
        if optimize:
            log("fusing attention, LayerNorm and GELU for ONNX Runtime ...")
            staged = _stage(tmpdir, tmp_path, location, "unfused")
            choice = choose_fusions(staged, tmp_path, manifest, external=external, log=log)  # the fastest here
            manifest["optimization"] = {"layerscale_folded": folded, "fusions": choice["fusions"], "fusion_choice": choice,
                                        "runtime": "ONNX Runtime only (com.microsoft ops)"}
        if validate:
            log("validating against PyTorch ...")
            report = validate_model(tmp_path, model, manifest, images_dir=validate_images, reference=reference,
                                    log=log)
            manifest["validation"] = _validated(report)
            if steps:
                report["steps"] = {**steps, "fused": {k: report[k] for k in ("rel_max_abs_diff", "mask_mismatch", "passed")}}
        else:
            manifest["validation"] = {"skipped": True}
        if quantize:
            log("quantizing the MatMuls to int8 ...")
            staged = _stage(tmpdir, tmp_path, location, "fp32")
            info = quantize_graph(quantize, staged, tmp_path, manifest, workdir=tmpdir / "int8", images_dir=validate_images,
                                  per_channel=quantize_per_channel, plan=int8_plan, log=log)
            location = manifest["external_data"] = None  # int8 weights stay well under protobuf's limit
            log("validating int8 against the fp32 graph ...")
            report = validate_int8(staged, tmp_path, manifest, images_dir=validate_images, n_images=int8_images,
                                   log=log)
            manifest["quantization"] = {"type": quantize, **info, "validation": report}
            if not report["passed"]:
                raise ToleranceError(f"int8 validation failed: {report['failure']}; nothing was written. The float32 "
                                     f"graph passed: export it without --quantize {quantize} (see docs/performance.md, int8)",
                                     report)
        inline_tmp = None
        if inline:
            import onnx.inliner

            inline_tmp = tmpdir / (output.stem + ".inline.onnx")
            inlined = onnx.inliner.inline_local_functions(onnx.load(str(tmp_path)))
            _save(inlined, inline_tmp, external and not quantize)
            manifest["inline_copy"] = inline_tmp.name
        # store the final manifest in the graph too (the weights, if external, stay where they are)
        final = onnx.load(str(tmp_path), load_external_data=False)
        _set_metadata(final, manifest)
        onnx.save_model(final, str(tmp_path))
        _publish(tmpdir, output, location, inline_tmp)
        write_manifest(output, manifest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    inline_path = output.with_name(inline_tmp.name) if inline_tmp else None
    return ExportResult(output, manifest, inline_path)


def _validated(report: dict) -> dict:
    if not report["passed"]:
        raise ToleranceError(f"validation failed: {report['failure']}", report)
    return report


def _stage(tmpdir: Path, path: Path, location: str | None, name: str) -> Path:
    """Move a graph (and its external data) into ``tmpdir/name/`` so the next step can write ``path``."""
    stage = tmpdir / name
    stage.mkdir()
    os.replace(path, stage / path.name)
    if location:
        os.replace(path.with_name(location), stage / location)
    return stage / path.name


def _publish(tmpdir: Path, output: Path, location: str | None, inline_tmp: Path | None) -> None:
    """Move the validated files into place: external data first, the graph last."""
    stale = manifest_path(output)
    if stale.exists():
        stale.unlink()  # a manifest must never describe a different graph
    if location:
        os.replace(tmpdir / location, output.parent / location)
    if inline_tmp is not None:
        inline_data = inline_tmp.with_name(inline_tmp.name + ".data")
        if inline_data.exists():
            os.replace(inline_data, output.with_name(inline_data.name))
        os.replace(inline_tmp, output.with_name(inline_tmp.name))
    os.replace(tmpdir / output.name, output)


def spec_from_manifest(manifest: dict) -> ModelSpec:
    """The registry entry a manifest was exported from, with the architecture it records."""

    arch = ArchConfig(**manifest["arch"])
    prep = manifest["preprocessing"]
    try:
        base = get_model_spec(manifest["model"])
    except KeyError:  # tiny test specs and other unregistered architectures
        base = get_model_spec({"dinov2": "dinov2_vits14", "clip": "clip_vitb16", "deit3": "deit3_base16"}[manifest["family"]])
    return dataclasses.replace(
        base, name=manifest["model"], arch=arch,
        preprocessing=Preprocessing(tuple(prep["mean"]), tuple(prep["std"]), prep["resolution"][0],
                                    prep.get("resize", "squash"), prep.get("interpolation", "bicubic")),
    )


def revalidate(onnx_path: str | os.PathLike, *, weights: str | None = None, images_dir=None,
               log: Callable[[str], None] = lambda m: None) -> dict:
    """itae-validate: rebuild the PyTorch model from the manifest and compare again."""

    manifest = read_manifest(onnx_path)
    if "quantization" in manifest:
        raise InputError(f"{onnx_path}: an int8 graph is validated against its fp32 graph at export "
                         "(manifest: quantization.validation); itae-validate re-runs fp32 and fp16 validations only")
    spec = spec_from_manifest(manifest)
    itae = {k: v for k, v in manifest["itae"].items() if k in {f.name for f in dataclasses.fields(ITAEOptions)}}
    options = ITAEOptions(**itae)
    recorded = manifest.get("weights", {})
    source = weights or recorded.get("source")
    if not source or not Path(source).exists():
        raise CheckpointError(
            f"{onnx_path}: the weights it was exported from ({recorded.get('source') or 'unknown'}) are not on this "
            "machine; pass --weights PATH"
        )
    model, loaded = checkpoints.load_model(spec, options, weights=source, pos_rule=manifest.get("pos_rule"))
    if recorded.get("sha256") and loaded.sha256 != recorded["sha256"]:
        raise CheckpointError(f"{source}: sha256 {loaded.sha256[:12]}… differs from the exported weights' "
                              f"{recorded['sha256'][:12]}…")
    res = manifest["preprocessing"]["resolution"][0]
    model.fix_resolution(res)
    return validate_model(onnx_path, model.float().eval(), manifest, images_dir=images_dir, log=log)
