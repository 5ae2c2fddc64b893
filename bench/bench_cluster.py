"""Throughput of itae-cluster against bare ONNX Runtime inference, in one run.

The job (scan, decode and resize in a worker pool, inference, the SQLite store, K-Means, the
output files) should reach at least 0.85x the images/s of bare inference of the same model and
batch size on pre-decoded pixels: decoding hides behind inference.

    .venv/bin/python bench/bench_cluster.py                 # real-size ViT-S/14, random weights
    .venv/bin/python bench/bench_cluster.py --pool process --workers 2 --n 256
    .venv/bin/python bench/bench_cluster.py --onnx fp32.onnx --against int8.onnx   # two graphs, in turns

Bare inference is timed before and after the job and averaged, so a load change on a shared
machine does not favour either side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import imagefolders as datasets  # noqa: E402  (tests/imagefolders.py: real-image folders)

sys.path.insert(0, str(HERE))
from common import print_machine  # noqa: E402

from itae_export.data.store import CACHE_ENV  # noqa: E402


def ensure_model(path: Path, name: str) -> Path:
    """The real-size architecture with random weights, exported once (weights do not change speed)."""
    if path.is_file():
        return path
    from itae_export.model.vit import build_model, init_random_
    from itae_export.onnx.export import export_onnx
    from itae_export.registry import ITAEOptions, get_model_spec

    spec = get_model_spec(name)
    print(f"exporting {spec.name} with random weights to {path} ...", file=sys.stderr)
    model = init_random_(build_model(spec), seed=0)
    return export_onnx(spec, ITAEOptions.for_model(spec), path, model=model, validate=False).path


def build_folder(root: Path, dataset: str, n: int) -> int:
    if dataset == "textile":
        per_class = -(-n // 3)
        labels = datasets.textile_folder(root, per_class=per_class)
    else:
        labels = datasets.fashion_folder(root, per_class=-(-n // 10), fmt="jpg")
    for rel in sorted(labels)[n:]:  # exactly n images
        (root / rel).unlink()
    return min(n, len(labels))


def bare_inference(onnx_path: Path, pixels: np.ndarray, batch_size: int, threads: int | None,
                   device: str = "cpu") -> float:
    """images/s of session.run alone on already preprocessed batches, same session options as the job."""
    from itae_export.runtime import Embedder, open_session

    sess, provider = open_session(onnx_path, device, intra_op_threads=threads, spinning=False)
    embed = Embedder(sess, provider)
    embed(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        embed(pixels[i:i + batch_size])
    return len(pixels) / (time.perf_counter() - t0)


def compare_jobs(root: Path, a: Path, b: Path, bare_px: np.ndarray, n: int, tmp: Path, args) -> None:
    """itae-cluster end to end on graph ``a`` against graph ``b``: jobs in turns (a b a b ...),
    medians of images/s, and bare inference of both before and after."""
    import statistics

    from itae_export.cluster.job import run_cluster_job

    graphs = {"A": a, "B": b}
    bare = {k: [bare_inference(p, bare_px, args.batch_size, args.threads, args.device)] for k, p in graphs.items()}
    job: dict[str, list[float]] = {k: [] for k in graphs}
    for turn in range(args.turns):
        for k, p in graphs.items():
            # a fresh embedding cache for every job: with the shared one (issue 21) every turn after
            # the first would read its vectors back instead of embedding
            os.environ[CACHE_ENV] = str(tmp / f"cache_{k}_{turn}")
            t0 = time.perf_counter()
            run_cluster_job(root, p, 3, tmp / f"out_{k}_{turn}", batch_size=args.batch_size, workers=args.workers,
                            pool=args.pool, device=args.device, intra_op_threads=args.threads, progress=False)
            job[k].append(n / (time.perf_counter() - t0))
            print(f"turn {turn + 1}: job {k} ({p.name}) {job[k][-1]:.2f} images/s", file=sys.stderr, flush=True)
    for k, p in graphs.items():
        bare[k].append(bare_inference(p, bare_px, args.batch_size, args.threads, args.device))
    med = {k: statistics.median(v) for k, v in job.items()}
    for k, p in graphs.items():
        print(f"{k} {p}: itae-cluster {med[k]:.2f} images/s end to end ({n} images, {args.turns} turns: "
              f"{', '.join(f'{v:.2f}' for v in job[k])}); bare ORT before/after {bare[k][0]:.2f}/{bare[k][1]:.2f}")
    ratio = med["B"] / med["A"]
    print(f"end to end B / A: {ratio:.3f}x; bare B / A: {sum(bare['B']) / sum(bare['A']):.3f}x")
    result = {"a": str(a), "b": str(b), "images": n, "batch_size": args.batch_size, "turns": args.turns,
              "job_images_per_s": job, "bare_images_per_s": bare, "ratio_b_over_a": round(ratio, 3)}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--onnx", type=Path, default=None, help="default: exported/bench_<model>_random.onnx")
    ap.add_argument("--dataset", choices=["textile", "fashion"], default="textile")
    ap.add_argument("--n", type=int, default=320, help="images in the job (fixed costs amortise over them)")
    ap.add_argument("--bare-n", type=int, default=128, help="images per bare-inference timing")
    ap.add_argument("--batch-size", type=int, default=None, help="default: itae-cluster's CPU default")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--pool", choices=["thread", "process"], default="thread")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    ap.add_argument("--min-ratio", type=float, default=0.85)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--against", type=Path, default=None,
                    help="a second graph (e.g. the int8 one): both jobs run in turns on the same files")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--turns", type=int, default=1, help="with --against: turns of (job A, job B)")
    args = ap.parse_args()
    print_machine(args.threads)

    from itae_export.data.embed import default_batch_size, default_workers
    from itae_export.cluster.job import run_cluster_job
    from itae_export.images import PreprocessSpec, load_image, scan_images
    from itae_export.onnx.manifest import read_manifest

    provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    args.batch_size = args.batch_size or default_batch_size(provider)
    onnx_path = ensure_model(args.onnx or Path("exported") / f"bench_{args.model}_random.onnx", args.model)
    tmp = Path(tempfile.mkdtemp(prefix="itae-bench-"))
    os.environ[CACHE_ENV] = str(tmp / "cache")  # nothing read from, or left in, the user's embedding cache
    try:
        root = tmp / "photos"
        n = build_folder(root, args.dataset, args.n)
        pre = PreprocessSpec.from_manifest(read_manifest(onnx_path)["preprocessing"])
        pixels = np.stack([load_image(p, pre) for p in scan_images(root)])

        bare_px = pixels[: max(args.batch_size, args.bare_n)]
        if args.against:
            compare_jobs(root, onnx_path, args.against, bare_px, n, tmp, args)
            return
        bare1 = bare_inference(onnx_path, bare_px, args.batch_size, args.threads, args.device)
        t0 = time.perf_counter()
        summary = run_cluster_job(root, onnx_path, 3, tmp / "out", batch_size=args.batch_size, workers=args.workers,
                                  pool=args.pool, device=args.device, intra_op_threads=args.threads, progress=False)
        job_wall = time.perf_counter() - t0
        bare2 = bare_inference(onnx_path, bare_px, args.batch_size, args.threads, args.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bare = (bare1 + bare2) / 2
    job = n / job_wall
    result = {
        "model": args.model, "images": n, "dataset": args.dataset, "batch_size": args.batch_size,
        "workers": args.workers or default_workers(provider), "device": args.device, "pool": args.pool, "ort_threads": args.threads or "default",
        "bare_images_per_s": round(bare, 2), "bare_before_after": [round(bare1, 2), round(bare2, 2)],
        "job_images_per_s": round(job, 2), "job_embed_only_images_per_s": summary["images_per_s"],
        "job_timings": summary["timings"], "ratio": round(job / bare, 3),
    }
    print(f"bare ONNX Runtime: {bare:.2f} images/s  (before {bare1:.2f}, after {bare2:.2f})")
    print(f"itae-cluster job:  {job:.2f} images/s  end to end ({n} images, wall {job_wall:.1f} s; "
          f"embedding stage {summary['images_per_s']:.2f} images/s)")
    print(f"ratio:             {job / bare:.3f}  (target >= {args.min_ratio})")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if job / bare >= args.min_ratio else 1)


if __name__ == "__main__":
    main()
