"""Export an ITAE-patched encoder to ONNX: custom-domain nodes, local functions, a manifest,
and a validation against PyTorch before anything lands at the output path."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import glob
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from itae_export import __version__
from itae_export.errors import CheckpointError, InputError, OptionError, OutputError, ToleranceError
from itae_export.files import describe_os_error, ensure_dir
from itae_export.model.itae import inject_itae
from itae_export.onnx.contract import (
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAME,
    ITAE_DOMAIN,
    ITAE_DOMAIN_VERSION,
    MANIFEST_SCHEMA,
    MAX_BATCH,
    ONNX_OPSET,
    OUTPUT_CLS_ATTENTION,
    OUTPUT_EMBEDDING,
    OUTPUT_EMBEDDING_UNPATCHED,
    OUTPUT_MASK,
    PRECISIONS,
    QUANTIZATIONS,
    STAGING_OWNER,
    STAGING_SUFFIX,
    external_data_name,
)
from itae_export.onnx.functions import attach_functions, translation_table
from itae_export.onnx.manifest import (
    manifest_path,
    read_manifest,
    registry_difference,
    seal,
    seal_with_weights,
    write_manifest,
)
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
                        precision: str = "fp32", quantize: str | None = None, unpatched_output: bool = False) -> Path:
    """``exported/<model>_<res>_<itae options>[_fp16][_int8][_unpatched].onnx``."""
    spec = get_model_spec(spec) if isinstance(spec, str) else spec
    res = resolution or spec.preprocessing.resolution
    name = f"{spec.name}_{res}_{options.slug()}"
    if precision != "fp32":
        name += f"_{precision}"
    if quantize:
        name += f"_{quantize}"
    if unpatched_output:
        name += "_unpatched"
    return export_dir() / f"{name}.onnx"


class _ExportWrapper:
    """Builds the torch module whose outputs are the contract's outputs (lazy torch import)."""

    @staticmethod
    def make(model, attention_output: bool, half: bool, unpatched_output: bool = False):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                x = pixel_values.half() if half else pixel_values
                # the outputs need only the CLS row
                f = self.model.forward_features(x, cls_only=True, unpatched=unpatched_output)
                outs = (f["embedding"].float(), f["artifact_mask"])
                if attention_output:
                    outs = outs + (f["cls_attention"].float(),)
                if unpatched_output:
                    outs = outs + (f["embedding_unpatched"].float(),)
                return outs

        return Wrapper().eval()


def output_names(attention_output: bool, unpatched_output: bool = False) -> list[str]:
    names = [OUTPUT_EMBEDDING, OUTPUT_MASK]
    if attention_output:
        names.append(OUTPUT_CLS_ATTENTION)
    if unpatched_output:
        names.append(OUTPUT_EMBEDDING_UNPATCHED)
    return names


def _torch_export(model, resolution: int, attention_output: bool, half: bool, path: Path, external: bool,
                  unpatched_output: bool = False):
    """torch.export -> ONNX at ``path`` with ``itae`` nodes; returns (graph proto without weights
    loaded when external, external data file name or None). Saved through the IR so that models
    over protobuf's 2 GiB limit (ViT-g/14) never become one in-memory proto."""
    import onnx
    import onnx_ir
    import torch


    wrapper = _ExportWrapper.make(model, attention_output, half, unpatched_output)
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
                output_names=output_names(attention_output, unpatched_output),
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


MAX_PATCHES_PER_SIDE = 128  # 1,792 pixels at patch 14: 16,384 tokens, 1 GiB of attention per head and image


def _set_metadata(proto, manifest: dict, weights_folder: Path | None = None) -> None:
    for node in proto.graph.node:  # the exporter's per-node stack traces: build paths, most of the graph's bytes
        del node.metadata_props[:]
    proto.doc_string = f"{manifest['model']} with ITAE ({json.dumps(manifest['itae'])}); exported by itae-export"
    proto.producer_name = "itae-export"
    proto.producer_version = manifest["package_version"]
    if weights_folder is None:
        seal(proto, manifest)  # the manifest, its flat copies and the integrity digest, last
    else:
        seal_with_weights(proto, manifest, weights_folder)


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
                   attention_output: bool, pos_rule: str, weights_info: dict, num_tokens: int,
                   unpatched_output: bool = False) -> dict:
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
    if unpatched_output:
        outputs.append({"name": OUTPUT_EMBEDDING_UNPATCHED, "dtype": "float32", "shape": ["batch", spec.embed_dim]})
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


@dataclasses.dataclass
class ExportRequest:
    """Everything that shapes an exported graph, checked once (see :func:`export_onnx`)."""

    spec: ModelSpec
    options: ITAEOptions
    output: Path
    resolution: int
    precision: str = "fp32"
    attention_output: bool = False
    unpatched_output: bool = False  # also the CLS embedding without the ITAE edit (embedding_unpatched)
    inline: bool = False
    validate: bool = True
    validate_images: str | os.PathLike | None = None
    external_data: bool | None = None
    optimize: bool = False
    quantize: str | None = None
    quantize_per_channel: bool = True
    int8_images: int = 256
    int8_plan: str | os.PathLike | None = None  # --int8-plan: a saved layer plan of --quantize int8-static

    @classmethod
    def make(cls, spec_or_name: ModelSpec | str, options: ITAEOptions | None, output, **kw) -> "ExportRequest":
        spec = get_model_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
        options = options or ITAEOptions.for_model(spec)
        precision, quantize = kw.get("precision", "fp32"), kw.get("quantize")
        if precision not in PRECISIONS:
            raise OptionError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise OptionError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
        if quantize and (precision != "fp32" or not kw.get("validate", True)):
            raise OptionError(f"--quantize {quantize} starts from the validated fp32 graph: use --precision fp32 and --validate")
        resolution = kw.pop("resolution", None)
        resolution = spec.preprocessing.resolution if resolution is None else resolution
        p = spec.arch.patch_size
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % p:
            raise OptionError(f"--resolution: {resolution} is not a positive multiple of the patch size {p}")
        if resolution // p > MAX_PATCHES_PER_SIDE:  # a typo (22400 for 224) would otherwise hang, then exhaust memory
            t = (resolution // p) ** 2
            raise OptionError(f"--resolution: {resolution} is {resolution // p} patches a side, more than "
                              f"{MAX_PATCHES_PER_SIDE} ({MAX_PATCHES_PER_SIDE * p} pixels): {t:,} tokens, whose attention "
                              f"takes {4 * t * t / 2**30:,.0f} GiB per head and image")
        output = Path(output) if output else default_output_path(spec, options, resolution, precision, quantize,
                                                                 kw.get("unpatched_output", False))
        if output.suffix != ".onnx":
            raise OptionError(f"--output: {output} must end with .onnx")
        return cls(spec, options, output, resolution, **kw)


def export_onnx(spec_or_name: ModelSpec | str, options: ITAEOptions | None = None,
                output: str | os.PathLike | None = None, *, weights: str | None = None, model=None,
                weights_info: dict | None = None, pos_rule: str | None = None,
                log: Callable[[str], None] = lambda msg: None, **settings) -> ExportResult:
    """Export ``spec_or_name`` with ITAE ``options`` to ``output`` (default: under exported/).

    ``settings`` are the fields of :class:`ExportRequest` (resolution, precision, attention_output,
    inline, validate, validate_images, external_data, optimize, quantize, ...). ``model`` lets callers
    pass an already-built VisionTransformer; otherwise the weights come from ``weights`` or the
    official source. Nothing is written at ``output`` unless validation passes (or
    ``validate=False``). ``optimize``: LayerScale folded and ORT fusions, validated before and after.
    ``quantize="int8"``: int8 MatMuls, validated against the fp32 graph on real images.
    """
    req = ExportRequest.make(spec_or_name, options, output, **settings)
    if model is None or weights is not None:
        weights_id = checkpoints.weights_identity(req.spec, weights)
    else:  # an in-memory model: its weights are known only by what the caller says
        weights_id = f"sha256:{weights_info['sha256']}" if (weights_info or {}).get("sha256") else "in-memory"
    model, weights_info = _load_model(req, model, weights, weights_info, pos_rule, log)
    job = _ExportJob(req, model, weights_info, log)
    job.manifest["identity"] = export_identity(req, weights_id, pos_rule)
    with staging_folder(req.output, log) as tmpdir:
        job.write_graph(tmpdir)
        job.validate_and_optimize()
        job.quantize()
        inline_tmp = job.write_inline_copy()
        job.publish(inline_tmp)
    inline_path = req.output.with_name(inline_tmp.name) if inline_tmp else None
    return ExportResult(req.output, job.manifest, inline_path)


def export_identity(req: "ExportRequest", weights_id: str, pos_rule: str | None) -> dict:
    """Everything that shapes the graph: a cached export is reused only when all of it matches."""
    from importlib.metadata import version

    return {
        "model": req.spec.name, "weights": weights_id, "pos_rule": pos_rule, "resolution": req.resolution,
        "precision": req.precision, "itae": req.options.to_dict(), "optimize": req.optimize,
        "quantize": req.quantize, "attention_output": req.attention_output,
        "unpatched_output": req.unpatched_output, "package_version": __version__,
        "exporter": {pkg: version(pkg) for pkg in ("torch", "onnx", "onnxscript")},
    }


def ensure_export(spec: ModelSpec, options: ITAEOptions, *, resolution: int | None = None, precision: str = "fp32",
                  weights: str | None = None, pos_rule: str | None = None, preloaded: dict | None = None,
                  unpatched_output: bool = False, log: Callable[[str], None] = lambda m: None) -> Path:
    """The exported model for these options and weights under exported/: reused when everything that
    shapes the graph matches (:func:`export_identity`), exported (again) otherwise."""
    req = ExportRequest.make(spec, options, None, resolution=resolution, precision=precision,
                             unpatched_output=unpatched_output)
    path = req.output
    if path.is_file():
        want = export_identity(req, checkpoints.weights_identity(spec, weights), pos_rule)
        try:
            have = read_manifest(path).get("identity")
        except InputError as e:
            have, why = None, str(e)
        else:
            why = "it records no export identity" if have is None else None
        if have is not None:
            diff = [k for k in want if want[k] != have.get(k)]
            if not diff:
                log(f"Using {path}")
                return path
            why = f"it was exported with another {', '.join(diff)}"
        log(f"{path} exists, but {why}: exporting it again")
    else:
        log(f"{path} is missing: exporting {spec.name} ({options.slug()}) first")
    return export_onnx(spec, options, path, weights=weights, pos_rule=pos_rule, resolution=resolution,
                       precision=precision, unpatched_output=unpatched_output, log=log, **(preloaded or {})).path


@contextlib.contextmanager
def staging_folder(output: Path, log: Callable[[str], None] = lambda m: None):
    """A hidden folder beside ``output`` (owned by this process, removed afterwards) in which a graph
    is written and validated before it is moved into place; stale ones of killed runs go first."""
    ensure_dir(output.parent, "--output")
    remove_stale_staging(output, log)
    try:
        tmpdir = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.stem}.", suffix=STAGING_SUFFIX))
        (tmpdir / STAGING_OWNER).write_text(f"{os.getpid()}\n")
    except OSError as e:
        raise OutputError(f"--output: cannot write into {output.parent} ({describe_os_error(e)})") from None
    try:
        yield tmpdir
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def remove_stale_staging(output: Path, log: Callable[[str], None] = lambda m: None) -> None:
    """Remove the staging folders that killed exports of ``output`` left behind (their process is gone)."""
    for d in output.parent.glob(f".{glob.escape(output.stem)}.*{STAGING_SUFFIX}"):
        try:
            pid = int((d / STAGING_OWNER).read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _alive(pid):
            continue  # another export of the same file is running
        if pid is None and time.time() - d.stat().st_mtime < 24 * 3600:
            continue  # no owner recorded (being created, or an older version): only when a day old
        shutil.rmtree(d, ignore_errors=True)
        log(f"removed {d}, left by an export that did not finish")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_model(req: ExportRequest, model, weights, weights_info, pos_rule, log):
    """(float32 eval model with ITAE injected, weights entry of the manifest)."""
    if model is None:
        log(f"loading weights for {req.spec.name} ...")
        model, loaded = checkpoints.load_model(req.spec, req.options, weights=weights, pos_rule=pos_rule)
        weights_info = loaded.info()
    else:
        inject_itae(model, req.options)
        if pos_rule:
            model.pos_rule = pos_rule
        weights_info = weights_info or {"source": "in-memory model", "format": "torch", "sha256": None}
    model = model.float().eval()
    req.spec = dataclasses.replace(req.spec, arch=model.cfg)  # a checkpoint may carry its own position grid
    model.fix_resolution(req.resolution)
    return model, weights_info


class _ExportJob:
    """The stages of one export, in order: write the graph, validate (and fuse), quantize, publish.
    Every stage works inside the staging folder; only publish touches the output path."""

    def __init__(self, req: ExportRequest, model, weights_info: dict, log):
        self.req, self.model, self.log = req, model, log
        spec, res = req.spec, req.resolution
        num_tokens = 1 + spec.arch.num_register_tokens + (res // spec.arch.patch_size) ** 2
        self.manifest = build_manifest(spec, req.options, resolution=res, precision=req.precision,
                                       attention_output=req.attention_output, pos_rule=model.applied_pos_rule(res),
                                       weights_info=weights_info, num_tokens=num_tokens,
                                       unpatched_output=req.unpatched_output)
        self.reference = None  # the PyTorch reference outputs, computed once per export
        self.folded = None

    def _export_model(self):
        """The module that is traced: the model itself, or a copy with LayerScale folded / in float16."""
        if self.req.precision != "fp16" and not self.req.optimize:
            return self.model
        m = copy.deepcopy(self.model)
        if self.req.optimize:
            self.folded = fold_layerscale_(m)
        if self.req.precision == "fp16":
            m = m.half()
        m.fix_resolution(self.req.resolution)
        return m

    def write_graph(self, tmpdir: Path) -> None:
        import onnx
        import torch

        req = self.req
        self.log(f"exporting {req.spec.name} at {req.resolution}x{req.resolution} ({req.precision}, "
                 f"{req.options.slug()}) ...")
        export_model = self._export_model()
        self.external = (req.external_data if req.external_data is not None
                         else _weights_nbytes(export_model) > EXTERNAL_DATA_THRESHOLD)
        self.tmpdir, self.tmp_path = tmpdir, tmpdir / req.output.name
        with torch.no_grad():
            proto, self.location = _torch_export(export_model, req.resolution, req.attention_output,
                                                 req.precision == "fp16", self.tmp_path, self.external,
                                                 req.unpatched_output)
        self.manifest["external_data"] = self.location
        _set_metadata(proto, self.manifest)
        onnx.save_model(proto, str(self.tmp_path))

    def _validate(self) -> dict:
        req = self.req
        if self.reference is None:
            self.reference = torch_reference(self.model, self.manifest, req.validate_images)
        return _validated(validate_model(self.tmp_path, self.model, self.manifest, images_dir=req.validate_images,
                                         reference=self.reference, log=self.log))

    def validate_and_optimize(self) -> None:
        req = self.req
        steps = {}
        if req.optimize:
            if req.validate:
                self.log("validating the exported graph (LayerScale folded) against PyTorch ...")
                steps["exported"] = self._validate()
            self.log("fusing attention, LayerNorm and GELU for ONNX Runtime ...")
            staged = _stage(self.tmpdir, self.tmp_path, self.location, "unfused")
            choice = choose_fusions(staged, self.tmp_path, self.manifest, external=self.external,
                                    log=self.log)  # only the fusions that are faster on this CPU
            self.manifest["optimization"] = {"layerscale_folded": self.folded, "fusions": choice["fusions"],
                                             "fusion_choice": choice,
                                             "runtime": "ONNX Runtime only (com.microsoft ops)"}
        if not req.validate:
            self.manifest["validation"] = {"skipped": True}
            return
        self.log("validating against PyTorch ...")
        report = self._validate()
        if steps:
            report["steps"] = {**steps, "fused": {k: report[k] for k in ("rel_max_abs_diff", "mask_mismatch", "passed")}}
        self.manifest["validation"] = report

    def quantize(self) -> None:
        req = self.req
        if not req.quantize:
            return
        self.log("quantizing the MatMuls to int8 ...")
        staged = _stage(self.tmpdir, self.tmp_path, self.location, "fp32")
        info = quantize_graph(req.quantize, staged, self.tmp_path, self.manifest, workdir=self.tmpdir / "int8",
                              images_dir=req.validate_images, per_channel=req.quantize_per_channel,
                              plan=req.int8_plan, log=self.log)
        self.location = self.manifest["external_data"] = None  # int8 weights stay well under protobuf's limit
        self.log("validating int8 against the fp32 graph ...")
        report = validate_int8(staged, self.tmp_path, self.manifest, images_dir=req.validate_images,
                               n_images=req.int8_images, log=self.log)
        self.manifest["quantization"] = {"type": req.quantize, **info, "validation": report}
        if not report["passed"]:
            raise ToleranceError(f"int8 validation failed: {report['failure']}; nothing was written. The float32 "
                                 f"graph passed: export it without --quantize {req.quantize} (see docs/performance.md, int8)",
                                 report)

    def write_inline_copy(self) -> Path | None:
        if not self.req.inline:
            return None
        import onnx
        import onnx.inliner

        inline_tmp = self.tmpdir / (self.req.output.stem + ".inline.onnx")
        inlined = onnx.inliner.inline_local_functions(onnx.load(str(self.tmp_path)))
        _save(inlined, inline_tmp, self.external and not self.req.quantize)
        self.manifest["inline_copy"] = inline_tmp.name
        return inline_tmp

    def publish(self, inline_tmp: Path | None) -> None:
        """The final manifest into the graph too (external weights stay where they are), then into place."""
        import onnx

        final = onnx.load(str(self.tmp_path), load_external_data=False)
        _set_metadata(final, self.manifest, weights_folder=self.tmpdir)  # the weight file's digest too
        onnx.save_model(final, str(self.tmp_path))
        if inline_tmp is not None:  # the same final manifest, sealed over the inlined graph and its own weights
            inlined = onnx.load(str(inline_tmp), load_external_data=False)
            _set_metadata(inlined, copy.deepcopy(self.manifest), weights_folder=self.tmpdir)
            onnx.save_model(inlined, str(inline_tmp))
        _publish(self.tmpdir, self.req.output, self.location, inline_tmp)
        write_manifest(self.req.output, self.manifest)


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
        inline_data = inline_tmp.with_name(external_data_name(inline_tmp.name))
        if inline_data.exists():
            os.replace(inline_data, output.with_name(inline_data.name))
        os.replace(inline_tmp, output.with_name(inline_tmp.name))
    os.replace(tmpdir / output.name, output)


def spec_from_manifest(manifest: dict) -> ModelSpec:
    """The model a manifest describes, rebuilt from the manifest alone (it records the architecture,
    the preprocessing and the position rule), so unregistered architectures revalidate too."""
    prep = manifest["preprocessing"]
    return ModelSpec(
        name=manifest["model"], family=manifest["family"], arch=ArchConfig(**manifest["arch"]),
        theta=manifest["itae"]["theta"], pos_rule=manifest.get("pos_rule", "none"),
        preprocessing=Preprocessing(tuple(prep["mean"]), tuple(prep["std"]), prep["resolution"][0],
                                    prep.get("resize", "squash"), prep.get("interpolation", "bicubic")),
    )


def revalidate(onnx_path: str | os.PathLike, *, weights: str | None = None, images_dir=None,
               log: Callable[[str], None] = lambda m: None) -> dict:
    """itae-validate: rebuild the PyTorch model from the manifest and compare again."""

    manifest = read_manifest(onnx_path, verify=True)  # the digest too: a graph changed after export is refused
    field = registry_difference(manifest)
    if field is not None:
        raise InputError(f"{onnx_path}: the manifest's '{field}' differs from the registry's {manifest['model']}: the "
                         "model would be fed wrongly normalised pixels; export it again")
    if "quantization" in manifest:
        raise InputError(f"{onnx_path}: an int8 graph is validated against its fp32 graph at export "
                         "(manifest: quantization.validation); itae-validate re-runs fp32 and fp16 validations only")
    model = model_from_manifest(manifest, onnx_path, weights=weights)
    return validate_model(onnx_path, model, manifest, images_dir=images_dir, log=log)


def options_from_manifest(manifest: dict) -> ITAEOptions:
    itae = {k: v for k, v in manifest["itae"].items() if k in {f.name for f in dataclasses.fields(ITAEOptions)}}
    return ITAEOptions(**itae)


def model_from_manifest(manifest: dict, onnx_path, *, weights: str | None = None):
    """The float32 PyTorch model (ITAE injected as recorded) that an exported graph was made from,
    rebuilt from its manifest and the weights it names (or ``weights``), checked by sha256."""
    spec = spec_from_manifest(manifest)
    recorded = manifest.get("weights", {})
    source = weights or recorded.get("source")
    if not source or not Path(source).exists():
        raise CheckpointError(
            f"{onnx_path}: the weights it was exported from ({recorded.get('source') or 'unknown'}) are not on this "
            "machine; pass --weights PATH"
        )
    model, loaded = checkpoints.load_model(spec, options_from_manifest(manifest), weights=source,
                                           pos_rule=manifest.get("pos_rule"))
    if recorded.get("sha256") and loaded.sha256 != recorded["sha256"]:
        raise CheckpointError(f"{source}: sha256 {loaded.sha256[:12]}… differs from the exported weights' "
                              f"{recorded['sha256'][:12]}…")
    model.fix_resolution(manifest["preprocessing"]["resolution"][0])
    return model.float().eval()
