"""itae-inspect: the norm histogram of a model on images (a folder, a path list, WebDataset tars), a suggested
theta, attention maps."""

from __future__ import annotations

from pathlib import Path

import click
from itae_export.cli._common import PathParam, model_choice, report_errors
from itae_export.images import DEFAULT_MAX_PIXELS
from itae_export.onnx.contract import MAX_BATCH

EPILOG = """\b
Examples:
  itae-inspect photos/ --model vits14_reg
  itae-inspect photos/ --model vits14 --weights vit_s_focus.onnx --attention
  itae-inspect photos/ --model vitb14 --source key --theta 3.5 --max-images 200 --out inspect_b14/
  itae-inspect photos.tar --model vits14_reg                # WebDataset tars, or a list.txt/.csv/.parquet
  itae-inspect photos/ --model vits14 --random-weights      # a demo of the pictures, meaningless numbers

INPUT is read like itae-cluster reads it: a folder, a path list (.txt, .csv, .parquet) or WebDataset tars
(a .tar, a folder of them, shards/{00000..00099}.tar). Images that cannot be read are listed with their
reason (stderr, and "skipped" in inspect.json).

Writes into --out (default <input>_inspect/): norms_hist.png (paper Fig. 2: counts of the last
block's projection norms on a log scale, current and suggested theta marked), inspect.json
(suggested theta, confidence, bimodality verdict, counts per side, artifacts per image) and, with
--attention, attention.png (paper Fig. 4). The JSON is also printed on stdout.
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("folder", metavar="INPUT", type=PathParam(path_type=Path))
@click.option("--model", "model_name", type=model_choice(), metavar="NAME", required=True, help="A registry model.")
@click.option("--weights", type=PathParam(dir_okay=True), default=None,
              help="Local checkpoint (any format itae-export reads). Default: the official weights.")
@click.option("--random-weights", is_flag=True,
              help="Random weights instead of a checkpoint: for demos and tests only, the numbers mean nothing.")
@click.option("--source", type=click.Choice(["query", "key", "value"]), default="query", show_default=True,
              help="Projection of the last block whose norms are shown.")
@click.option("--theta", type=click.FloatRange(min=0), default=None,
              help="The current theta, marked on the histogram (default: the model's).")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True,
              help="Use at most this many images, evenly spaced over the input's order.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images with more pixels are skipped before decoding (listed with the reason), as in itae-cluster.")
@click.option("--out", "out_dir", type=PathParam(file_okay=False, path_type=Path),
              help="Output folder (default: <input>_inspect/ beside the input).")
@click.option("--attention", is_flag=True, help="Also draw CLS attention maps, original against ITAE (Fig. 4).")
@click.option("--attention-images", type=click.IntRange(min=1, max=16), default=4, show_default=True,
              help="[--attention] Number of images in the attention figure.")
@click.option("--attention-backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="[--attention] onnx: the cls_attention output of two exported models (ITAE and --no-itae), run "
                   "in ONNX Runtime; torch: the same PyTorch model, no export (faster).")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="[--random-weights] Seed of the weights.")
@click.option("-q", "--quiet", is_flag=True, help="No informational lines on stderr (the JSON still goes to stdout).")
@report_errors
def main(folder, model_name, weights, random_weights, source, theta, max_images, max_pixels, out_dir, attention,
         attention_images, attention_backend, batch_size, seed, quiet):
    """Histogram of the last block's projection norms over the images of INPUT, with a suggested
    theta from the valley of the (bimodal) distribution; optionally the CLS attention maps."""
    from itae_export.calibrate.inspection import dumps, format_result, inspect_folder

    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    if random_weights and weights:
        raise click.UsageError("--random-weights and --weights exclude each other")
    result = inspect_folder(folder, model_name, weights=weights, random_weights=random_weights, source=source,
                            theta=theta, max_images=max_images, out_dir=out_dir, attention=attention,
                            attention_images=attention_images, attention_backend=attention_backend,
                            batch_size=batch_size, seed=seed, max_pixels=max_pixels, log=log)
    log(format_result(result))
    if result["warning"]:
        click.echo("warning: " + result["warning"], err=True)
    click.echo(dumps(result))


if __name__ == "__main__":
    main()
