"""itae-validate: run an exported model's validation against PyTorch again."""

from __future__ import annotations

import click
from itae_export.cli._common import PathParam, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("onnx_path", type=PathParam(exists=True, dir_okay=False))
@click.option("--weights", type=PathParam(exists=True), default=None,
              help="The checkpoint it was exported from [the path recorded in the manifest].")
@click.option("--validate-images", metavar="INPUT", type=PathParam(), default=None,
              help="Also compare on these images: a folder, a path list or WebDataset tars.")
@report_errors
def main(onnx_path, weights, validate_images):
    """Compare ONNX_PATH in ONNX Runtime with the PyTorch ITAE model it came from; exit 1 on mismatch."""
    from itae_export.errors import ToleranceError
    from itae_export.onnx.export import revalidate
    from itae_export.onnx.preprocess_graph import is_in_graph, revalidate_in_graph
    from itae_export.onnx.validate import format_report

    again = revalidate_in_graph if is_in_graph(onnx_path) else revalidate  # --preprocess-in-graph variant
    report = again(onnx_path, weights=weights, images_dir=validate_images)
    click.echo(format_report(report))
    if not report["passed"]:
        raise ToleranceError(f"{onnx_path}: {report['failure']}", report)


if __name__ == "__main__":
    main()
