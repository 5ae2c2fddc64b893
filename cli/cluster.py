"""itae-cluster: embed every image in a folder with an exported ITAE model and cluster them."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from itae_export.cli._common import PathParam, itae_flags, model_choice, report_errors, weight_flags

from itae_export.cluster.job import MAX_EPOCHS, MAX_N_INIT
from itae_export.cluster.tensors import write_inputs_and_masks
from itae_export.images import DEFAULT_MAX_PIXELS
from itae_export.registry import DEFAULT_CLUSTER_MODEL
from itae_export.onnx.contract import MAX_BATCH

EPILOG = """\b
Examples:
  itae-cluster photos/ --k 10 --onnx exported/dinov2_vitb14_224_itae-t3.onnx
  itae-cluster photos/ --k 10 --model vitb14            # exports it first if missing
  itae-cluster imagenette/ --k 10 --model vits14_reg --labels-from-dirs --protocol paper

  itae-cluster photos.tar --k 10 --onnx model.onnx      # WebDataset tars (a .tar, a folder of them, a{000..009}.tar)
  itae-cluster list.txt --k 10 --onnx model.onnx        # a list of paths (.txt, .lst, .csv, .parquet)

Outputs in --out (default <input>_itae/): assignments.csv, embeddings.npy, summary.json, skipped.csv.
Embeddings are kept in the shared embedding cache ($ITAE_CACHE_DIR, default ~/.cache/itae-export):
re-running after an interruption, or into another --out, embeds only the images that are missing or changed.
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("folder", metavar="INPUT", type=PathParam(path_type=Path))
@click.option("--k", "k", type=str, required=True,
              help="Number of clusters (2 to the number of images), or 'auto' to pick it (see --k-max, --k-criterion).")
@click.option("--onnx", "onnx_path", type=PathParam(dir_okay=False, path_type=Path),
              help="An exported model (.onnx with its .json manifest beside it).")
@click.option("--model", "model_name", type=model_choice(), metavar="NAME",
              help="A registry model: uses exported/<name>_<res>_<itae>.onnx, exporting it first if missing or "
                   f"exported from other weights or options. Default (without --onnx): {DEFAULT_CLUSTER_MODEL}. "
                   "The ITAE and weight flags below apply only with --model.")
@itae_flags
@weight_flags
@click.option("--out", "out_dir", type=PathParam(file_okay=False, path_type=Path),
              help="Output folder (default: <folder>_itae/ beside the folder).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when usable, otherwise CPU.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=None,
              help="Images per inference batch (default: 8 on CPU, 128 on CUDA).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decode workers (default: cores - 1, at most 4 on CPU and 16 on CUDA; never more than 4 threads or "
                   "1 process per core).")
@click.option("--pool", type=click.Choice(["thread", "process"]), default="thread", show_default=True,
              help="Decode in threads (PIL releases the GIL) or processes.")
@click.option("--threads", "intra_op_threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads on CPU (default: ORT's choice, the physical cores; at most the "
                   "cores this process may use).")
@click.option("--seed", type=int, default=0, show_default=True, help="K-Means random state.")
@click.option("--n-init", type=click.IntRange(min=1, max=MAX_N_INIT), default=10, show_default=True,
              help="K-Means restarts.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images with more pixels are skipped before decoding (skipped.csv says so): a decoded image "
                   "costs 3 bytes a pixel in every decode worker.")
@click.option("--labels-from-dirs", is_flag=True,
              help="Labels are parent folder names (ImageFolder): adds ACC, NMI and ARI.")
@click.option("--protocol", type=click.Choice(["paper"]),
              help="paper: also the paper's evaluation (20 sets x 25 K-Means runs, mean ± s.e.).")
@click.option("--sets", "protocol_sets", type=click.IntRange(min=1), default=20, show_default=True,
              help="[--protocol paper] Number of sets.")
@click.option("--runs", "protocol_runs", type=click.IntRange(min=1), default=25, show_default=True,
              help="[--protocol paper] K-Means runs per set.")
@click.option("--k-max", type=click.IntRange(min=2), default=20, show_default=True, help="[--k auto] Largest k tried.")
@click.option("--k-criterion", type=click.Choice(["silhouette", "eigengap"]), default="silhouette", show_default=True,
              help="[--k auto] silhouette: best mean cosine silhouette of K-Means; eigengap: largest gap of the "
                   "k-NN graph Laplacian's eigenvalues. The curve goes to summary.json.")
@click.option("--method", type=click.Choice(["kmeans", "tsp", "temi"]), default="kmeans", show_default=True,
              help="kmeans, or a clustering head trained on the embeddings: tsp (TSP, one-layer cosine heads, "
                   "neighbour consistency) or temi (TEMI, MLP heads with a PMI loss). See docs/heads.md.")
@click.option("--epochs", type=click.IntRange(1, MAX_EPOCHS), default=None,
              help="[--method tsp|temi] Training epochs (default: the paper's, 100 for TSP, 200 for TEMI, or "
                   "more to reach 2,000 optimiser steps on small collections).")
@click.option("--head-out", type=PathParam(dir_okay=False, path_type=Path), default=None,
              help="[--method tsp|temi] Write the trained head as ONNX here, and the encoder with the head "
                   "appended as <name>.with_encoder.onnx (image -> embedding, cluster_probs, cluster).")
@click.option("--knn-reference", type=PathParam(exists=True, file_okay=False, path_type=Path), default=None,
              help="[--labels-from-dirs] A labelled ImageFolder: adds 10-NN classification accuracy of FOLDER's "
                   "images against it (cosine, weighted vote).")
@click.option("--compare-baseline", is_flag=True,
              help="Also cluster the unpatched CLS embedding of the same pass (the graph's embedding_unpatched "
                   "output; --model exports with it) and report both, with the images whose cluster changed.")
@click.option("--report", is_flag=True, help="Also write an HTML report into the output folder.")
@click.option("--save-inputs", is_flag=True, help="Also write pixel_values.npy and artifact_mask.npy (rows as in "
              "embeddings.npy; one more decode and CPU pass) for comparing a port (docs/onnx-contract.md).")
@click.option("--save-inputs-rgb", is_flag=True, help="With --save-inputs, also the uint8 images before normalising: "
              "decoded_rgb.npy (+ _shapes.npy) as decoded, resized_rgb.npy after the resize (docs/outputs.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no informational lines.")
@report_errors
def main(folder, k, onnx_path, model_name, theta, source, group, strategy, rows, lsa, no_itae, weights, pos_rule,
         resolution, precision, out_dir, device, batch_size, workers, pool, intra_op_threads, seed, n_init, max_pixels,
         labels_from_dirs,
         protocol, protocol_sets, protocol_runs, k_max, k_criterion, method, epochs, head_out, knn_reference,
         compare_baseline, report, save_inputs, save_inputs_rgb, quiet):
    """Embed every image of INPUT (a folder, a list of paths, or WebDataset tars) with an exported ITAE
    model on ONNX Runtime, then cluster them with K-Means on the L2-normalised embeddings (or a
    TSP/TEMI head with --method)."""
    # Long only by its parameter list: Click passes every option; the body parses, calls
    # resolve_options/ensure_export/run_cluster, and reports.
    from itae_export.calibrate.auto import resolve_options  # the library loads only when a command runs
    from itae_export.calibrate.inspection import inspect_run
    from itae_export.cluster.artifacts import report_lines
    from itae_export.cluster.baseline import format_baseline, require_unpatched_output
    from itae_export.cluster.job import format_summary
    from itae_export.cluster.shard_cluster import run_cluster
    from itae_export.cluster.report import write_report
    from itae_export.onnx.export import ensure_export
    from itae_export.onnx.manifest import read_manifest
    from itae_export.registry import get_model_spec

    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    if k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise click.BadParameter(f"{k!r} is not an integer or 'auto'", param_hint="--k") from None
    if onnx_path is not None and model_name is not None:
        raise click.UsageError("give one of --onnx PATH or --model NAME, not both")
    if onnx_path is None and model_name is None:
        model_name = DEFAULT_CLUSTER_MODEL
        log(f"No --onnx or --model: using {DEFAULT_CLUSTER_MODEL}, the paper's main model (docs/cli-cluster.md)")
    model_flags = {"--theta": theta, "--source": source, "--group": group, "--strategy": strategy, "--rows": rows,
                   "--lsa/--no-lsa": lsa, "--no-itae": no_itae or None, "--weights": weights,
                   "--pos-rule": pos_rule, "--resolution": resolution}
    if onnx_path is not None:
        used = [name for name, v in model_flags.items() if v is not None]
        if used or precision != "fp32":
            used += ["--precision"] if precision != "fp32" else []
            raise click.UsageError(f"{', '.join(used)}: only with --model; an --onnx model carries its own options")
    try:
        if model_name is not None:
            spec = get_model_spec(model_name)
            # --theta auto calibrates on the folder being clustered
            options, preloaded = resolve_options(spec, theta=theta, source=source, group=group, strategy=strategy,
                                                 rows=rows, lsa=lsa, enabled=not no_itae, calibration_images=folder,
                                                 weights=weights, pos_rule=pos_rule, log=log)
            onnx_path = ensure_export(spec, options, resolution=resolution, precision=precision, weights=weights,
                                      pos_rule=pos_rule, preloaded=preloaded, unpatched_output=compare_baseline,
                                      log=log)
        elif compare_baseline:
            require_unpatched_output(read_manifest(onnx_path), onnx_path)  # before any embedding
        summary = run_cluster(
            folder, onnx_path, k, out_dir, seed=seed, n_init=n_init, max_pixels=max_pixels, batch_size=batch_size,
            workers=workers,
            pool=pool, device=device, intra_op_threads=intra_op_threads, use_labels=labels_from_dirs,
            protocol=protocol, protocol_sets=protocol_sets, protocol_runs=protocol_runs, progress=not quiet,
            method=method, k_max=k_max, k_criterion=k_criterion,
            head_params={"epochs": epochs} if epochs else None, head_out=head_out, knn_reference=knn_reference,
            compare_baseline=compare_baseline, log=log,
        )
        if (save_inputs or save_inputs_rgb) and "shards" in summary:
            log("--save-inputs: not written for the sharded stages (no embeddings.npy); see docs/scale.md")
            save_inputs = save_inputs_rgb = False
        if (save_inputs or save_inputs_rgb) and summary.get("input", {}).get("kind") == "webdataset":
            log("--save-inputs: not for WebDataset tars (it reads the image files again); the outputs are written")
            save_inputs = save_inputs_rgb = False
        if report:
            log(f"Report: {write_report(summary['out_dir'], pictures=inspect_run)}")
        if save_inputs or save_inputs_rgb:  # the model's inputs and masks beside the embeddings (cluster.tensors)
            log(f"Inputs and masks: {write_inputs_and_masks(summary['out_dir'], images=save_inputs_rgb)['rows']} rows")
    except KeyboardInterrupt:
        click.echo("Interrupted: the embeddings of finished batches are saved; run the same command again "
                   "to resume.", err=True)
        sys.exit(130)
    lines = [format_summary(summary)]
    lines += report_lines(summary["artifacts"]) if "artifacts" in summary else []  # the flagged tokens per image
    lines += format_baseline(summary["baseline"]) if "baseline" in summary else []
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
