"""itae-export: write an ITAE-patched encoder as ONNX, validated against PyTorch."""

from __future__ import annotations

import click
from itae_export.cli._common import PathParam, itae_flags, model_choice, report_errors, weight_flags

from itae_export.onnx.contract import QUANTIZATIONS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model_name", type=model_choice(), required=True, metavar="NAME",
              help="Registry name or alias, e.g. dinov2_vitl14 or vitl14 (list: itae-models).")
@itae_flags
@weight_flags
@click.option("--output", "-o", type=PathParam(dir_okay=False), default=None,
              help="Output .onnx path [exported/<model>_<res>_<options>.onnx].")
@click.option("--attention-output", is_flag=True, help="Add the output cls_attention [batch, heads, T].")
@click.option("--unpatched-output", is_flag=True,
              help="Add the output embedding_unpatched [batch, D]: the CLS embedding without the ITAE edit "
                   "(itae-cluster --compare-baseline).")
@click.option("--inline", is_flag=True, help="Also write <name>.inline.onnx with the itae functions inlined.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare with PyTorch before publishing.")
@click.option("--validate-images", "validate_images", metavar="INPUT", type=PathParam(), default=None,
              help="Also validate on these images: a folder, a path list (.txt/.lst/.csv/.parquet) or "
                   "WebDataset tars, read as itae-cluster reads them.")
@click.option("--calibration-images", "calibration_images", metavar="INPUT", type=PathParam(), default=None,
              help="Images for --theta auto (any INPUT as for --validate-images); also validated on (and their "
                   "artifacts counted) when --validate-images is not given.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in <name>.onnx.data [automatic above ~1.8 GB].")
@click.option("--optimize", is_flag=True,
              help="Fold LayerScale and fuse attention/LayerNorm/GELU for ONNX Runtime (com.microsoft ops; "
                   "only the fusions that run fastest on this CPU, timed at export; validated before and after).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="int8 MatMuls (ITAE norms stay float32): dynamic, or static QDQ (SmoothQuant first) calibrated on "
                   "real images with the layers that move the clusters kept float32; validated against fp32 on real images "
                   "(--validate-images INPUT, else Fashion-MNIST where installed).")
@click.option("--preprocess-in-graph", is_flag=True,
              help="Also write <name>_image.onnx: uint8 [batch, h, w, 3] RGB images in, resize and normalisation "
                   "as ONNX ops (validated against PyTorch with the same resize; docs/onnx-contract.md).")
@click.option("--triton", "triton_repo", type=PathParam(file_okay=False), default=None,
              help="Also write a Triton model repository: DIR/<name>/1/model.onnx and config.pbtxt "
                   "(and DIR/<name>_image/ with --preprocess-in-graph).")
@click.option("--int8-plan", type=PathParam(exists=True, dir_okay=False), default=None,
              help="With --quantize int8-static: reuse this layer plan (bench/bench_int8_static.py --save-plan).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the output path.")
@report_errors
def main(model_name, theta, source, group, strategy, rows, lsa, no_itae, weights, pos_rule, resolution, precision,
         output, attention_output, unpatched_output, inline, validate, validate_images, calibration_images, external_data, optimize,
         quantize, int8_plan, preprocess_in_graph, triton_repo, quiet):
    """Export MODEL with ITAE baked in as nodes of the `itae` ONNX domain.

    \b
    Example:
      itae-export --model vitl14 --theta 3.0
      itae-export --model vits14 --weights vit_s_focus.onnx --output exported/focus.onnx
      itae-export --model vitb14 --optimize --quantize int8 --validate-images photos/
    """
    from itae_export.calibrate.auto import resolve_options  # the library loads only when a command runs
    from itae_export.onnx.export import default_output_path, export_onnx
    from itae_export.onnx.optimize import format_int8_report
    from itae_export.onnx.preprocess_graph import export_in_graph
    from itae_export.onnx.triton import write_triton_repository
    from itae_export.onnx.validate import format_report
    from itae_export.registry import get_model_spec

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    if theta == "auto" and not calibration_images:
        raise click.UsageError("--theta auto needs --calibration-images INPUT (a folder, a path list or tars)")
    spec = get_model_spec(model_name)
    if preprocess_in_graph and quantize:
        raise click.UsageError("--preprocess-in-graph starts from a float graph; drop --quantize int8")
    check_targets(output, triton_repo, preprocess_in_graph, quantize, int8_plan, log)  # before any work
    options, preloaded = resolve_options(spec, theta=theta, source=source, group=group, strategy=strategy, rows=rows,
                                         lsa=lsa, enabled=not no_itae, calibration_images=calibration_images,
                                         weights=weights, pos_rule=pos_rule, log=log)
    if output is None and triton_repo:  # the default name is known once --theta auto is resolved
        check_targets(default_output_path(spec, options, resolution, precision, quantize), triton_repo,
                      preprocess_in_graph, None, None, lambda m: None)
    result = export_onnx(spec, options, output, weights=weights, pos_rule=pos_rule, resolution=resolution, **preloaded,
                         precision=precision, attention_output=attention_output, inline=inline,
                         unpatched_output=unpatched_output,
                         validate=validate, validate_images=validate_images or calibration_images,
                         external_data=external_data,
                         optimize=optimize, quantize=quantize, int8_plan=int8_plan, log=log)
    if not quiet:
        if result.validation.get("skipped"):  # a validation that ran was already reported by the log
            click.echo(format_report(result.validation), err=True)
        if "quantization" in result.manifest:
            click.echo(format_int8_report(result.manifest["quantization"]["validation"]), err=True)
        click.echo(f"manifest: {result.path.with_suffix('.json')}", err=True)
        if result.inline_path:
            click.echo(f"inlined copy: {result.inline_path}", err=True)
    click.echo(str(result.path))
    extra = [export_in_graph(result.path, model=preloaded.get("model"), weights=weights, validate=validate,
                             log=log).path] if preprocess_in_graph else []  # post-processing steps
    for path in ([result.path, *extra] if triton_repo else extra):
        click.echo(str(write_triton_repository(path, triton_repo) if triton_repo else path))


def check_targets(output, triton_repo, preprocess_in_graph, quantize, int8_plan, log) -> None:
    """The options that would otherwise fail only after the export (or the calibration): the
    output path, the Triton repository and model names, tritonclient, the int8 plan."""
    from pathlib import Path

    from itae_export.files import check_writable
    from itae_export.onnx.optimize import read_int8_plan
    from itae_export.onnx.preprocess_graph import in_graph_path
    from itae_export.onnx.triton import INSTALL_HINT, check_repository, tritonclient_available

    if int8_plan is not None:
        if quantize != "int8-static":
            raise click.UsageError("--int8-plan is the layer plan of --quantize int8-static; add that option")
        read_int8_plan(int8_plan)
    if output is not None:
        output = Path(output)
        if output.suffix != ".onnx":
            raise click.BadParameter(f"{output} must end with .onnx", param_hint="--output")
        check_writable(output, "--output", folder=False)
    if triton_repo:
        names = [] if output is None else [output.stem] + ([in_graph_path(output).stem] if preprocess_in_graph else [])
        check_repository(triton_repo, names)
        if not tritonclient_available():
            log(f"--triton: tritonclient is not installed; config.pbtxt is written without Triton's own parse "
                f"check ({INSTALL_HINT} adds it)")


if __name__ == "__main__":
    main()
