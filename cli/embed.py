"""itae-embed: the sharded stages for millions of images (embed, then cluster), for a scheduler to drive."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from itae_export.cli._common import PathParam, report_errors

from itae_export.cluster.job import MAX_N_INIT, MAX_NITER, metrics_line
from itae_export.errors import InputError
from itae_export.images import DEFAULT_MAX_PIXELS
from itae_export.onnx.contract import MAX_BATCH

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

RUN_EPILOG = """\b
Examples:
  itae-embed run photos/ --out shards/ --onnx model.onnx                     # everything, here
  itae-embed run paths.parquet --out shards/ --onnx model.onnx --shard 3/16  # one slice of 16
  itae-embed run 'laion/{00000..00999}.tar' --out shards/ --onnx model.onnx --engine ray
  itae-embed cluster shards/ --k 1000

\b
A Slurm array:  sbatch --array=0-15 --wrap 'itae-embed run paths.txt --out shards/ --onnx m.onnx --shard $SLURM_ARRAY_TASK_ID/16'
Re-running a command after a kill redoes only what is missing. Both engines share the embedding
cache of itae-cluster ($ITAE_CACHE_DIR, default ~/.cache/itae-export; on Ray, the driver's): images
already embedded with the same model are not embedded again. See docs/scale.md.
"""


@click.group(context_settings=CONTEXT)
def main():
    """Sharded embedding and clustering of large image sets (docs/scale.md)."""


@main.command("run", epilog=RUN_EPILOG, context_settings=CONTEXT)
@click.argument("input_spec", metavar="INPUT", type=PathParam())
@click.option("--out", "out_dir", type=PathParam(file_okay=False, path_type=Path), required=True,
              help="The shard directory (manifest.json, part-NNNNN.parquet, _state/).")
@click.option("--onnx", "onnx_path", type=PathParam(dir_okay=False, path_type=Path), required=True,
              help="An exported model (.onnx with its .json manifest beside it).")
@click.option("--shard", default="0/1", show_default=True,
              help="i/N: embed only the parts p with p % N == i (for arrays of jobs).")
@click.option("--input-format", type=click.Choice(["auto", "folder", "list", "webdataset"]), default="auto",
              show_default=True, help="auto: a .tar, a folder of .tar or a {a..b} pattern is WebDataset; "
                                      ".txt/.lst/.csv/.parquet is a list of paths; any other folder is scanned.")
@click.option("--part-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Images per output part (folders and lists; a WebDataset tar is one part).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: decode threads + one ONNX Runtime session; ray: Ray Data (pip install -e '.[ray]' in the clone).")
@click.option("--ray-address", default=None,
              help="[--engine ray] An existing Ray cluster (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="[--engine ray] Inference actors (default: one per GPU, else 1).")
@click.option("--actor-cpus", type=click.FloatRange(min=0.25), default=None,
              help="[--engine ray] CPUs per actor, also its ONNX Runtime threads (default 1 on GPU, else 2).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=None,
              help="Images per inference batch (default: 8 on CPU, 128 on CUDA).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="[--engine local] Decode threads (at most 4 per core).")
@click.option("--threads", "intra_op_threads", type=click.IntRange(min=1), default=None,
              help="[--engine local] ONNX Runtime intra-op threads on CPU (at most the cores this process may use).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Skip (with a reason) images larger than this many pixels, read from the header before decoding.")
@click.option("--no-cache", is_flag=True,
              help="Neither read nor fill the shared embedding cache ($ITAE_CACHE_DIR; docs/scale.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no informational lines.")
@report_errors
def run_cmd(input_spec, out_dir, onnx_path, shard, input_format, part_size, engine, ray_address, actors, actor_cpus,
            device, batch_size, workers, intra_op_threads, max_pixels, no_cache, quiet):
    """Embed INPUT (a folder, a list of paths, or WebDataset tars) into per-part parquet files in --out."""
    from itae_export.data.sources import parse_shard

    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    try:
        parse_shard(shard)
    except InputError as e:  # a usage error: exit 2
        raise click.BadParameter(str(e).split(": ", 1)[-1], param_hint="--shard") from None
    ray_only = {"--ray-address": ray_address, "--actors": actors, "--actor-cpus": actor_cpus}
    local_only = {"--workers": workers, "--threads": intra_op_threads,
                  "--max-pixels": None if max_pixels == DEFAULT_MAX_PIXELS else max_pixels}
    if engine == "local" and any(v is not None for v in ray_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in ray_only.items() if v is not None)}: only with --engine ray")
    if engine == "ray" and any(v is not None for v in local_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in local_only.items() if v is not None)}: only with --engine local")
    try:
        if engine == "ray":
            from itae_export.engines.ray_embed import embed_shards_ray

            stats = embed_shards_ray(input_spec, out_dir, onnx_path, shard=shard, part_size=part_size,
                                     input_format=input_format, batch_size=batch_size, device=device,
                                     address=ray_address or os.environ.get("RAY_ADDRESS"), actors=actors,
                                     actor_cpus=actor_cpus, cache=not no_cache, log=log)
        else:
            from itae_export.engines.local import embed_shards

            stats = embed_shards(input_spec, out_dir, onnx_path, shard=shard, part_size=part_size,
                                 input_format=input_format, batch_size=batch_size, workers=workers, device=device,
                                 intra_op_threads=intra_op_threads, progress=not quiet, max_pixels=max_pixels,
                                 cache=not no_cache, log=log)
    except KeyboardInterrupt:
        click.echo("Interrupted: finished batches are saved; run the same command again to resume.", err=True)
        sys.exit(130)
    new = stats.embedded - stats.reused
    speed = f" at {new / stats.seconds:.1f} images/s" if new and stats.seconds > 0 else ""
    click.echo(f"Shard {shard}: {stats.parts_written} parts written, {stats.parts_done_before} were complete; "
               f"{new} embedded{speed}, {stats.reused} reused (from the embedding cache), "
               f"{stats.rows_resumed} resumed, {stats.skipped} skipped")
    for pid, why in sorted(stats.incomplete.items()):
        click.echo(f"part {pid} is incomplete: {why}", err=True)
    if stats.incomplete:
        sys.exit(1)


@main.command("cluster", context_settings=CONTEXT)
@click.argument("shard_dir", type=PathParam(file_okay=False, path_type=Path))
@click.option("--k", "k", type=click.IntRange(min=2), required=True, help="Number of clusters.")
@click.option("--out", "out_dir", type=PathParam(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: SHARD_DIR/clusters_k<k>).")
@click.option("--backend", type=click.Choice(["auto", "faiss", "sklearn"]), default="auto", show_default=True,
              help="auto: faiss from 20,000 vectors on (where installed), scikit-learn below.")
@click.option("--sample-size", type=click.IntRange(min=2), default=None,
              help="[faiss] Training sample (default: min(n, max(256 k, 65,536))).")
@click.option("--niter", type=click.IntRange(1, MAX_NITER), default=20, show_default=True, help="[faiss] Iterations.")
@click.option("--n-init", type=click.IntRange(min=1, max=MAX_N_INIT), default=10, show_default=True,
              help="[sklearn] Restarts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-partial", is_flag=True, help="Cluster the parts written so far instead of stopping.")
@click.option("--labels-from-dirs", is_flag=True,
              help="Each image's parent folder is its class: ACC/NMI/ARI in summary.json, a label column.")
@click.option("--report", is_flag=True,
              help="Also write report.html into the output folder (it reads the shards' vectors into memory).")
@click.option("-q", "--quiet", is_flag=True)
@report_errors
def cluster_cmd(shard_dir, k, out_dir, backend, sample_size, niter, n_init, seed, allow_partial, labels_from_dirs,
                report, quiet):
    """Cluster every vector of a shard directory (parts read one at a time, memory-mapped)."""
    from itae_export.calibrate.inspection import inspect_run
    from itae_export.cluster.artifacts import report_lines
    from itae_export.cluster.report import write_report
    from itae_export.cluster.shard_cluster import cluster_shards

    log = None if quiet else (lambda m: click.echo(m, err=True))
    s = cluster_shards(shard_dir, k, out_dir, backend=backend, sample_size=sample_size, niter=niter, seed=seed,
                       n_init=n_init, allow_partial=allow_partial, use_labels=labels_from_dirs, log=log)
    if report:
        path = write_report(s["out_dir"], pictures=inspect_run)
        if log:
            log(f"Report: {path}")
    c = s["counts"]
    lines = [f"Clustered {c['embedded']} vectors from {c['parts']} parts with {s['kmeans']['backend']} (k={k}); "
             f"outputs in {s['out_dir']}"]
    if "metrics" in s:
        lines.append(metrics_line(s["metrics"]))
    lines += report_lines(s["artifacts"])  # the flagged tokens per image
    click.echo("\n".join(lines))


@main.command("status", context_settings=CONTEXT)
@click.argument("shard_dir", type=PathParam(file_okay=False, path_type=Path))
@report_errors
def status_cmd(shard_dir):
    """Which parts of a shard directory are written, and which are missing."""
    from itae_export.data.shards import open_shards

    s = open_shards(shard_dir, allow_partial=True)
    total = len(s.manifest["parts"])
    done = total - len(s.missing) - len(s.incomplete)
    click.echo(f"{s.manifest['model'].get('name')} ({str(s.manifest['model'].get('id'))[:19]}...): {done} of "
               f"{total} parts written and complete, {s.n} vectors")
    for pid, why in sorted(s.incomplete.items()):
        click.echo(f"incomplete part {pid}: {why}")
    for pid, why in sorted(s.damaged.items()):
        click.echo(f"damaged part {pid}: {why}")
    if s.incomplete and not s.missing:
        sys.exit(1)
    if s.missing:
        click.echo("missing parts: " + ", ".join(map(str, s.missing[:50])) + (" ..." if len(s.missing) > 50 else ""))
        sys.exit(1)


if __name__ == "__main__":
    main()
